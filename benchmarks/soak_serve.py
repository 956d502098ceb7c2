"""Soak test of the gRPC server on loopback: clients mixing valid, invalid, cancelled and deadline-bound requests.

`--clients` threads (default 16) send requests back to back until `--requests` have been sent or `--seconds`
have passed, whichever comes first; server and clients share this process and talk over 127.0.0.1 only. Each
request is drawn (seeded) from four kinds:

- valid: a small generation (streamed, or unary) with a seed from a short list, so the same request comes
  back again and again: sampled alone (a batch of one) its mesh bytes must be the same each time;
- invalid: a bad field, a prompt of zero-width characters, a megabyte prompt, too many preview pixels, a
  unary reply over the limit, or bytes that are no message: each must be INVALID_ARGUMENT;
- cancelled: a long request (1000 steps, or 512 px previews) the client cancels after its first progress events;
- deadline: the same with a deadline of a second or two.

Printed: requests by kind and status, p50 / p99 latency of the valid ones, the worker's blocked time (the
server's `ln3diff_worker_blocked_seconds`: worker time spent after the last wanted request of a batch went
away), the process's RSS at the start, half-way and at the end (server and clients together: a plateau after
the first requests is the allocator and the caches, a leak keeps growing), and every mesh whose sha256
does not match: the bytes against the digest the server announced, and a batch of one against an earlier batch
of one of the same request. How many requests gave other bytes when sampled with other requests is counted
apart: batched matmuls round differently (latents differ by ~1e-5), so batching changes the mesh's last bits.

    python benchmarks/soak_serve.py [--ckpt PATH] [--clients 16] [--seconds 180] [--requests 3000] [--json [PATH]]
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from bench_serve import machine, served_generator  # the sibling script (run as python benchmarks/soak_serve.py)

from serve.client import Client, IntegrityError, build_request
from serve.server import SERVICE, ServerConfig, ServerThread
from serve.validation import Limits

PROMPTS = ["a red cube", "a wooden chair", "a blue vase", "a small house"]
SEEDS = [1, 2, 3]
VALID = dict(steps=4, mesh_resolution=32, faces=2000, preview_views=1, preview_size=32)
LONG = [dict(steps=1000, mesh_resolution=32, preview_views=0),  # cancelled while sampling
        dict(steps=2, preview_views=4, preview_size=512, skip_mesh=True)]  # cancelled inside a 512 px frame
KINDS = {"valid": 0.5, "invalid": 0.2, "cancelled": 0.15, "deadline": 0.15}


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


class Soak:
    """The shared tallies of one soak run."""

    def __init__(self, client: Client, requests: int, seconds: float):
        self.client, self.left, self.stop_at = client, requests, time.monotonic() + seconds
        self.lock = threading.Lock()
        self.codes: dict[str, collections.Counter] = {kind: collections.Counter() for kind in KINDS}
        self.latency: list[float] = []
        self.digests: dict[tuple, str] = {}  # (prompt, seed, format) -> sha256 when sampled alone
        self.mismatches: list[str] = []
        self.seen: dict[tuple, set[str]] = collections.defaultdict(set)  # (prompt, seed, format) -> every sha256

    def take(self) -> bool:
        with self.lock:
            if self.left <= 0 or time.monotonic() > self.stop_at:
                return False
            self.left -= 1
            return True

    def record(self, kind: str, code: str) -> None:
        with self.lock:
            self.codes[kind][code] += 1

    def client_loop(self, index: int) -> None:
        rng = random.Random(index)
        while self.take():
            kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
            try:
                code = getattr(self, kind)(rng)
            except grpc.RpcError as e:
                code = e.code().name
            except IntegrityError as e:
                code = "INTEGRITY_ERROR"
                with self.lock:
                    self.mismatches.append(f"announced sha256: {e}")
            self.record(kind, code)

    def valid(self, rng: random.Random) -> str:
        prompt, seed = rng.choice(PROMPTS), rng.choice(SEEDS)
        formats = rng.choice([("glb",), ("glb", "ply"), ("obj",)])
        t = time.monotonic()
        if rng.random() < 0.5:
            gen = self.client.generate(prompt, seed=seed, formats=formats, timeout=300, **VALID)
        else:
            gen = self.client.generate_unary(prompt, seed=seed, formats=formats, timeout=300, **VALID)
        seconds = time.monotonic() - t
        with self.lock:
            self.latency.append(seconds)
            for mesh in gen.result.meshes:  # the client checked the bytes against these digests
                key, digest = (prompt, seed, mesh.format), mesh.sha256
                self.seen[key].add(digest)
                if gen.result.batch_size == 1 and self.digests.setdefault(key, digest) != digest:
                    self.mismatches.append(f"{key} alone: {digest} after {self.digests[key]}")
        return "OK"

    def invalid(self, rng: random.Random) -> str:
        case = rng.randrange(7)
        if case == 6:  # bytes that are no GenerateRequest
            call = self.client.channel.unary_unary(f"/{SERVICE}/GenerateUnary")
            call(b"\x18" + b"\xff" * 11, timeout=30)
            return "OK"
        prompt, options = "a red cube", dict(VALID)
        if case == 0:
            options["steps"] = 100_000
        elif case == 1:
            options["sampler"] = "x" * (1 << 16)
        elif case == 2:
            prompt = "\u200b\u200d\ufeff"
        elif case == 3:
            prompt = " " * (1 << 20)
        elif case == 4:
            options.update(preview_views=16, preview_size=512)
        else:  # a unary reply over the limit
            self.client.generate_unary(prompt, mesh_resolution=256, faces=200_000, formats=["glb", "obj", "ply"],
                                       timeout=30)
            return "OK"
        self.client.stub.GenerateUnary(build_request(prompt, **options), timeout=30)
        return "OK"

    def cancelled(self, rng: random.Random) -> str:
        call = self.client.stub.Generate(build_request("a red cube", seed=rng.choice(SEEDS), **rng.choice(LONG)),
                                         timeout=300)
        wait_for = rng.randrange(1, 4)
        for response in call:
            if response.progress.stage not in ("", "queued") and (wait_for := wait_for - 1) == 0:
                call.cancel()
        return call.code().name

    def deadline(self, rng: random.Random) -> str:
        list(self.client.stub.Generate(build_request("a red cube", seed=rng.choice(SEEDS), **rng.choice(LONG)),
                                       timeout=rng.uniform(1.0, 2.0)))
        return "OK"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, default=None, help="default: the shipped model if present, "
                        "else a random-weight tiny checkpoint")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=180.0, help="stop sending after this long")
    parser.add_argument("--requests", type=int, default=3000, help="stop sending after this many")
    parser.add_argument("--json", nargs="?", const=str(Path(__file__).with_suffix(".json")), default=None,
                        help="also write the figures as JSON (default path: beside this script)")
    args = parser.parse_args()
    generator = served_generator(args.ckpt)
    where = machine(generator)
    print(f"{where}; {args.clients} clients, at most {args.requests} requests or {args.seconds:g} s, mix {KINDS}")
    limits = Limits(max_steps=1000, max_preview_pixels=4 * 512 * 512)  # what the long requests ask for
    server = ServerThread(lambda: generator, ServerConfig(port=0, max_queue=64, limits=limits)).wait_serving()
    try:
        with Client(f"127.0.0.1:{server.port}") as client:
            soak = Soak(client, args.requests, args.seconds)
            rss_start, start = rss_mib(), time.monotonic()
            threads = [threading.Thread(target=soak.client_loop, args=(i,)) for i in range(args.clients)]
            for t in threads:
                t.start()
            threads[0].join(args.seconds / 2)
            rss_half = rss_mib()
            for t in threads:
                t.join()
            wall, rss_end = time.monotonic() - start, rss_mib()
        registry = server.metrics.registry
        blocked_sum = registry.get_sample_value("ln3diff_worker_blocked_seconds_sum") or 0.0
        batches = int(registry.get_sample_value("ln3diff_worker_blocked_seconds_count") or 0)
        buckets = sorted((float(s.labels["le"]), s.value) for m in registry.collect()
                         if m.name == "ln3diff_worker_blocked_seconds" for s in m.samples
                         if s.name.endswith("_bucket"))
        blocked_max = next(le for le, count in buckets if count >= batches)  # the smallest bucket holding them all
    finally:
        server.stop(grace=5.0)
    latency = np.array(soak.latency) * 1e3
    figures = {
        "machine": where, "clients": args.clients, "seconds": round(wall, 1),
        "requests": sum(sum(c.values()) for c in soak.codes.values()),
        "by_kind": {kind: dict(codes) for kind, codes in soak.codes.items()},
        "valid_p50_ms": float(np.percentile(latency, 50)) if len(latency) else None,
        "valid_p99_ms": float(np.percentile(latency, 99)) if len(latency) else None,
        "worker_blocked_seconds": round(blocked_sum, 3), "batches": batches,
        "worker_blocked_max_seconds_at_most": blocked_max,
        "rss_mib_start": round(rss_start, 1), "rss_mib_half": round(rss_half, 1), "rss_mib_end": round(rss_end, 1),
        "sha256_mismatches": soak.mismatches,
        "batch_dependent_meshes": sum(len(d) > 1 for d in soak.seen.values()), "distinct_meshes": len(soak.seen)}
    print(f"{'kind':<10} {'requests':>8}  statuses")
    for kind, codes in soak.codes.items():
        print(f"{kind:<10} {sum(codes.values()):>8}  {', '.join(f'{c} {n}' for c, n in codes.most_common())}")
    print(f"{figures['requests']} requests in {wall:.0f} s; valid latency p50 {figures['valid_p50_ms']:.0f} ms, "
          f"p99 {figures['valid_p99_ms']:.0f} ms")
    print(f"worker blocked {blocked_sum:.2f} s in all over {batches} batches (each at most {blocked_max:g} s)")
    print(f"RSS {rss_start:.0f} MiB at the start, {rss_half:.0f} MiB half-way, {rss_end:.0f} MiB at the end")
    print(f"meshes whose sha256 does not match: {len(soak.mismatches)}")
    for line in soak.mismatches[:10]:
        print(f"  {line}")
    print(f"requests whose mesh bytes depend on their batch partners: {figures['batch_dependent_meshes']} of "
          f"{figures['distinct_meshes']}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

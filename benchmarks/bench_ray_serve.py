"""What Ray Serve adds to one request: the same small Generate through `ln3diff-serve` and through Ray's gRPC proxy.

One process starts a plain server (ServerThread) and a local Ray instance (`--cpus`, default 2) with the Ray
Serve application (one replica, one CPU), both on the same checkpoint, and sends one request at a time to
each, alternating, so background load hits both alike. The request is small (2 steps, no mesh, no previews)
so that the serving path, not the model, is what differs; the ratio and the difference of the medians are the
figures. Both model workers use one torch thread. Needs the cluster extra.

    python benchmarks/bench_ray_serve.py [--ckpt PATH] [--requests 20] [--json [PATH]]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ln3diff_rt.random_weights import random_checkpoint
from serve.client import Client
from serve.server import ServerConfig, ServerThread

WORKLOAD = dict(steps=2, guidance=3.0, skip_mesh=True, preview_views=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint (default: a random-weight tiny one)")
    p.add_argument("--requests", type=int, default=20, help="timed requests per server")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    p.add_argument("--json", nargs="?", const="bench_ray_serve.json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    torch.set_num_threads(1)
    import ray
    from ray import serve

    from ln3diff_rt.pipeline import Generator
    from serve.ray_app import GRPC_SERVICERS, build_app

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or random_checkpoint(Path(tmp) / "tiny.safetensors")
        started = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()},
                    grpc_options={"port": port, "grpc_servicer_functions": GRPC_SERVICERS})
        serve.run(build_app({"ckpt": str(ckpt), "max_batch": 1, "max_wait_ms": 0}), name="ln3diff")
        ray_start = time.perf_counter() - started
        plain = ServerThread(lambda: Generator.from_checkpoint(ckpt), ServerConfig(port=0, max_batch=1,
                                                                                    max_wait_ms=0)).wait_serving()
        seconds = {"plain": [], "ray": []}
        try:
            with Client(f"127.0.0.1:{plain.port}") as a, Client(f"127.0.0.1:{port}") as b:
                clients = {"plain": a, "ray": b}
                for i in range(args.requests + 2):  # the first two of each are warm-up
                    for name, client in clients.items():
                        t = time.perf_counter()
                        client.generate("a red cube", seed=i + 1, timeout=120.0, **WORKLOAD)
                        if i >= 2:
                            seconds[name].append(time.perf_counter() - t)
        finally:
            plain.stop()
            serve.shutdown()
            ray.shutdown()
    base, cand = (float(np.median(seconds[k])) * 1e3 for k in ("plain", "ray"))
    print(f"{'case':<34} {'plain ms':>10} {'ray ms':>10} {'ratio':>7}")
    print(f"{'one small Generate, median':<34} {base:>10.1f} {cand:>10.1f} {cand / base:>7.2f}")
    print(f"Ray adds {cand - base:.1f} ms a request (p90 plain {np.percentile(seconds['plain'], 90) * 1e3:.1f} ms, "
          f"ray {np.percentile(seconds['ray'], 90) * 1e3:.1f} ms); Ray and Serve started in {ray_start:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"workload": WORKLOAD, "requests": args.requests,
                                               "seconds": seconds, "median_ms": {"plain": base, "ray": cand},
                                               "ray_start_seconds": ray_start}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m serve --ckpt PATH [--port 50051] [--device cpu] ...`: run the ln3diff.v1 gRPC server.

SIGTERM or SIGINT starts a graceful shutdown: health turns NOT_SERVING, new RPCs are refused,
in-flight ones get `--grace` seconds to finish and are then cancelled (the worker stops at its next
check, within one ray or field-query chunk), and the process exits 0. Logs are JSON lines on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from ln3diff_rt.backends import BACKENDS, backends_help
from ln3diff_rt.options import add_precision_flag
from ln3diff_rt.pipeline import Generator
from serve.observability import configure_json_logging
from serve.server import Server, ServerConfig

log = logging.getLogger("serve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ln3diff-serve",
                                description="ln3diff.v1 gRPC server: prompts or images to 3D meshes.")
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint (default: the shipped tiny model)")
    p.add_argument("--backend", choices=list(BACKENDS), default="eager", help=backends_help())
    p.add_argument("--engine", type=Path, default=None, help="engine directory for aoti/onnx/tensorrt backends")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    add_precision_flag(p)
    p.add_argument("--text-encoder", default=None,
                   help="text encoder: a local directory or a cached Hugging Face id (default: the checkpoint's)")
    p.add_argument("--image-encoders", nargs=2, default=None, metavar=("CLIP", "DINO"),
                   help="the published image model's CLIP and DINOv2 encoders (default: the checkpoint's)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 or [::] for all interfaces")
    p.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one (logged)")
    p.add_argument("--max-batch", type=int, default=8, help="compatible requests sampled together")
    p.add_argument("--max-wait-ms", type=float, default=20.0,
                   help="how long the oldest waiting request waits for batch partners")
    p.add_argument("--max-queue", type=int, default=32, help="waiting requests beyond this get RESOURCE_EXHAUSTED")
    p.add_argument("--object-threads", type=int, default=1,
                   help="objects of a batch meshed, exported and previewed at once on threads: 1 (default) hands the "
                        "first object over soonest, 2 finishes a batch 1.07-1.27x faster per object on 2 CPU cores "
                        "(eager backend only)")
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token-file", type=Path, default=None,
                       help="file holding the bearer token every RPC but health must send as 'authorization: Bearer "
                            "TOKEN' (default: $LN3DIFF_TOKEN; neither: no auth)")
    token.add_argument("--token", default=None,
                       help="the token itself: visible to every user of the machine in ps, so prefer --token-file "
                            "or $LN3DIFF_TOKEN (kept, with a warning)")
    p.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain (with --tls-key)")
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key (with --tls-cert)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this HTTP port")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address /metrics listens on (default: this machine only, whatever --host is)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds in-flight requests get on shutdown")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        p.error("--tls-cert and --tls-key go together")
    for name in ("ckpt", "tls_cert", "tls_key", "token_file"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            p.error(f"--{name.replace('_', '-')} {path}: no such file")
    if args.max_batch < 1 or args.max_queue < 1 or args.max_wait_ms < 0 or args.object_threads < 1:
        p.error("--max-batch, --max-queue and --object-threads must be at least 1, --max-wait-ms at least 0")
    return args


def token_of(args: argparse.Namespace) -> str | None:
    """The bearer token: --token-file's content, else --token (with a warning: ps shows it), else $LN3DIFF_TOKEN;
    None: no auth."""
    if args.token_file is not None:
        token = args.token_file.read_text().strip()
        if not token:
            raise ValueError(f"--token-file {args.token_file} is empty")
        return token
    if args.token is not None:
        log.warning("--token is visible to every user of this machine (ps, /proc); use --token-file or "
                    "$LN3DIFF_TOKEN instead")
        return args.token or None
    return os.environ.get("LN3DIFF_TOKEN") or None


async def serve(args: argparse.Namespace) -> None:
    config = ServerConfig(host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                          object_threads=args.object_threads,
                          max_queue=args.max_queue, token=token_of(args), tls_cert=args.tls_cert,
                          tls_key=args.tls_key, metrics_port=args.metrics_port, metrics_host=args.metrics_host)
    encoders = tuple(args.image_encoders) if args.image_encoders else None
    server = Server(lambda: Generator.from_checkpoint(args.ckpt, args.device, args.backend, args.engine,
                                                      text_encoder=args.text_encoder, image_encoders=encoders,
                                                      precision=args.precision), config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    load, stopped = asyncio.create_task(server.load()), asyncio.create_task(stop.wait())
    await asyncio.wait({load, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if load.done() and load.exception() is not None:
        await server.stop(0)
        raise load.exception()
    await stopped
    await server.stop(args.grace)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_json_logging(args.log_level)
    try:
        asyncio.run(serve(args))
    except (ValueError, OSError, RuntimeError) as e:  # bad checkpoint, engine or bind address: one line
        log.error("cannot serve", extra={"fields": {"error": f"{type(e).__name__}: {e}"}})
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

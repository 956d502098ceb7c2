"""Client for ln3diff.v1, and its CLI: `python -m serve.client generate "a red cube" --out a.glb`.

Needs only grpcio and protobuf (no torch; `ln3diff_rt.options` is torch-free), so it also runs inside
Blender's Python. Its generation flags are the server's options, with the same names and bounds. The streamed
files (meshes, and a texture, an OBJ's MTL or levels of detail where asked) are reassembled from their chunks and
checked against the sizes and sha256 in the final Result.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ln3diff_rt.options import SEED, add_option_flags, option_specs
from serve.ln3diff.v1 import generator_pb2 as pb
from serve.ln3diff.v1 import generator_pb2_grpc as pb_grpc

DEFAULT_SERVER = "localhost:50051"
FORMATS = ("glb", "obj", "ply", "usdz", "usda")
ProgressFn = Callable[[str, int, int], None]  # (stage, step, total)


class IntegrityError(Exception):
    """The assembled mesh does not match the size or sha256 the server announced."""


@dataclass
class Generation:
    result: pb.Result
    meshes: dict[str, bytes] = field(default_factory=dict)  # MeshInfo.format ("glb", "LOD1.glb", "png") -> bytes
    previews: list[bytes] = field(default_factory=list)  # PNG files

    def write(self, out: Path, fmt: str) -> list[Path]:
        """The files of format `fmt` beside each other: the mesh at `out` (with levels of detail, `out`'s stem +
        `_LOD<k>`), the files it refers to (texture, MTL) under the names the server gave them; returns the paths."""
        names = {m.format: m.file_name for m in self.result.meshes}
        paths = []
        for key, data in self.meshes.items():
            if key == fmt or (key.startswith("LOD") and key.endswith(f".{fmt}")):
                path = out if key == fmt else out.with_name(f"{out.stem}_{key.split('.')[0]}{out.suffix}")
            elif key in ("png", "mtl"):
                name = names.get(key) or f"{out.stem}.{key}"
                if Path(name).name != name or name in ("", ".", ".."):
                    raise IntegrityError(f"{key}: the server named the file {name!r}, not a plain file name")
                path = out.with_name(name)
            else:
                continue
            path.write_bytes(data)
            paths.append(path)
        return paths


def build_request(prompt: str = "", *, seed: int | None = None, formats: Iterable[str] = ("glb",),
                  skip_mesh: bool = False, image: bytes | None = None, **options) -> pb.GenerateRequest:
    """A GenerateRequest; `options` are GenerationOptions fields (steps, guidance, mesh_resolution, ...),
    and a None one (or an absent seed) is left to the server (see GetModelInfo().defaults). `image` is the
    file's bytes (PNG, JPEG, WebP), sent as they are."""
    unknown = sorted(set(options) - set(option_specs()))
    if unknown:
        raise TypeError(f"unknown options {unknown}; expected some of {', '.join(option_specs())}")
    request = pb.GenerateRequest(prompt=prompt, formats=[] if skip_mesh else list(formats), skip_mesh=skip_mesh,
                                 image=image or b"")
    for name, value in (("seed", seed), *options.items()):
        if value is not None:
            setattr(request, name, value)
    return request


def assemble(responses: Iterable[pb.GenerateResponse], on_progress: ProgressFn | None = None) -> Generation:
    """Collect a Generate stream into a Generation, checking chunk order, sizes and sha256."""
    parts: dict[str, bytearray] = {}
    previews: list[bytes] = []
    for response in responses:
        kind = response.WhichOneof("event")
        if kind == "progress":
            if on_progress is not None:
                on_progress(response.progress.stage, response.progress.step, response.progress.total)
        elif kind == "preview":
            previews.append(response.preview.png)
        elif kind == "mesh_chunk":
            chunk = response.mesh_chunk
            data = parts.setdefault(chunk.format, bytearray())
            if chunk.offset != len(data):
                raise IntegrityError(f"{chunk.format}: chunk at offset {chunk.offset}, expected {len(data)}")
            data.extend(chunk.data)
        elif kind == "result":
            meshes = {fmt: bytes(data) for fmt, data in parts.items()}
            verify(response.result, meshes)
            return Generation(response.result, meshes, previews)
    raise IntegrityError("the stream ended without a result")


def verify(result: pb.Result, meshes: dict[str, bytes]) -> None:
    """Raise IntegrityError unless `meshes` holds exactly the files result.meshes describes."""
    announced = {m.format: m for m in result.meshes}
    if set(announced) != set(meshes):
        raise IntegrityError(f"received meshes {sorted(meshes)}, the result lists {sorted(announced)}")
    for fmt, data in meshes.items():
        info = announced[fmt]
        if len(data) != info.size:
            raise IntegrityError(f"{fmt}: assembled {len(data)} bytes, the server sent {info.size}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            raise IntegrityError(f"{fmt}: sha256 {digest} does not match the server's {info.sha256}")


class Client:
    """A channel to one server. `tls=True` uses the system roots, `root_certificates` a PEM of your own."""

    def __init__(self, target: str = DEFAULT_SERVER, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, max_message_bytes: int = 256 << 20):
        options = [("grpc.max_receive_message_length", max_message_bytes)]
        if tls or root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.GeneratorStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompt: str, timeout: float | None = None, on_progress: ProgressFn | None = None,
                 **options) -> Generation:
        """Stream one generation (options as in `build_request`) and return it verified."""
        call = self.stub.Generate(build_request(prompt, **options), timeout=timeout, metadata=self.metadata)
        try:
            return assemble(call, on_progress)
        finally:
            call.cancel()  # no-op once the stream has ended; frees the server's work if we stop early

    def generate_unary(self, prompt: str, timeout: float | None = None, **options) -> Generation:
        """The same in one response, for clients that cannot stream."""
        reply = self.stub.GenerateUnary(build_request(prompt, **options), timeout=timeout, metadata=self.metadata)
        meshes = {m.format: m.data for m in reply.meshes}
        verify(reply.result, meshes)
        return Generation(reply.result, meshes, [p.png for p in reply.previews])

    def model_info(self, timeout: float | None = 10.0) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout, metadata=self.metadata)

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """'SERVING', 'NOT_SERVING', ... as the standard grpc.health.v1 service reports it."""
        reply = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                               timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


# -- CLI ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ln3diff-client", description="ln3diff.v1 client")
    p.add_argument("--server", default=DEFAULT_SERVER, help=f"host:port (default {DEFAULT_SERVER})")
    p.add_argument("--token", default=os.environ.get("LN3DIFF_TOKEN"), help="bearer token (default $LN3DIFF_TOKEN)")
    p.add_argument("--tls", action="store_true", help="TLS with the system root certificates")
    p.add_argument("--tls-ca", type=Path, default=None, help="TLS with this PEM root certificate")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text or image to a mesh file")
    g.add_argument("prompt", nargs="?", default="", help="what to make (may be left out with --image)")
    g.add_argument("--image", type=Path, default=None,
                   help="condition image file: RGBA (alpha = the object's mask) or RGB on a plain background")
    g.add_argument("--out", type=Path, required=True,
                   help="mesh file; the suffix (.glb, .obj, .ply, .usdz, .usda) picks the format; a texture, an "
                        "OBJ's MTL and levels of detail (name_LOD1.glb ...) are written beside it")
    g.add_argument("--seed", type=int, default=None, help=f"{SEED.help} (default: the server draws one, printed)")
    add_option_flags(g, whose="the server's")
    g.add_argument("--previews", type=Path, default=None,
                   help="write the turntable PNGs into this directory (otherwise none are rendered)")
    sub.add_parser("info", help="model, backend and limits of the server")
    sub.add_parser("health", help="the server's health status")
    return p


def describe_model(info: pb.ModelInfo) -> str:
    """GetModelInfo as a few readable lines: the model, what it takes, its defaults and the server's limits."""
    takes = " and ".join(k for k, on in (("a prompt", info.text_input), ("an image", info.image_input)) if on)

    def fields(message) -> str:
        return ", ".join(f"{f.name} {v:g}" if isinstance(v, float) else f"{f.name} {v}"
                         for f, v in message.ListFields())

    defaults, limits = fields(info.defaults), fields(info.limits)
    lines = [f"model    {info.preset} ({info.checkpoint}, sha256 {info.checkpoint_sha256[:12]}...)",
             f"runs on  {info.backend} on {info.device}; takes {takes or 'nothing?'}",
             f"shapes   latent {'x'.join(map(str, info.latent_shape))}, tri-plane "
             f"{'x'.join(map(str, info.triplane_shape))}",
             f"formats  {', '.join(info.formats)}; samplers {', '.join(info.samplers)}",
             f"defaults {defaults}", f"limits   {limits}"]
    if info.vocabulary:
        lines.append(f"words    {' '.join(info.vocabulary)}")
    return "\n".join(lines)


def _show_progress(stage: str, step: int, total: int) -> None:
    end = "\n" if stage == "sample" and step == total else ""
    print(f"\r{stage:<12} {step}/{total}   ", end=end, file=sys.stderr, flush=True)


def _generate(client: Client, args: argparse.Namespace) -> None:
    fmt = args.out.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ValueError(f"--out {args.out}: the suffix picks the format, expected one of "
                         f"{', '.join('.' + f for f in FORMATS)}")
    options = {name: getattr(args, name) for name in option_specs()}
    if args.previews is None:
        options["preview_views"] = 0
    image = args.image.read_bytes() if args.image is not None else None
    gen = client.generate(args.prompt, timeout=args.timeout, on_progress=_show_progress, seed=args.seed,
                          formats=[fmt], image=image, **options)
    print(file=sys.stderr)
    r = gen.result
    if r.mesh_empty:
        raise ValueError(f"the model produced no surface for seed {r.seed}; try another seed or prompt")
    paths = gen.write(args.out, fmt)
    if args.previews is not None:
        args.previews.mkdir(parents=True, exist_ok=True)
        for i, png in enumerate(gen.previews):
            (args.previews / f"view_{i:03d}.png").write_bytes(png)
    files = ", ".join(f"{p} ({p.stat().st_size} bytes)" for p in paths)
    print(f"wrote {files}, sha256 verified, {r.face_count} faces; seed={r.seed} steps={r.steps} "
          f"guidance={r.guidance:g} in {r.timings['total']:.2f} s")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root = args.tls_ca.read_bytes() if args.tls_ca else None
    try:
        with Client(args.server, args.token, tls=args.tls, root_certificates=root) as client:
            if args.command == "generate":
                _generate(client, args)
            elif args.command == "info":
                print(describe_model(client.model_info(args.timeout or 10.0)))
            else:
                print(client.health(timeout=args.timeout or 5.0))
    except grpc.RpcError as e:
        print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (IntegrityError, ValueError, OSError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Generate the Python protobuf and gRPC stubs for ln3diff.v1: `python -m serve.codegen [--check]`.

protoc runs with `serve/proto` as the include root, so descriptors are named `ln3diff/v1/...` (what
reflection clients see); the gRPC stub's import of its messages is then rewritten to the package
path `serve.ln3diff.v1`. The output is committed; `--check` exits 1 if it is not current.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

SERVE = Path(__file__).resolve().parent
PROTO_ROOT = SERVE / "proto"
PROTOS = ["ln3diff/v1/generator.proto"]
OUT = SERVE / "ln3diff" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on PROTOS and write the stubs flat into out_dir; returns the files written."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}",
                f"--grpc_python_out={tmp}", *PROTOS]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTOS}")
        written = []
        for proto in PROTOS:
            package_dir = Path(tmp) / Path(proto).parent
            stem = Path(proto).stem
            for suffix in GENERATED_SUFFIXES:
                text = (package_dir / f"{stem}{suffix}").read_text()
                text = text.replace("from ln3diff.v1 import", "from serve.ln3diff.v1 import")
                # The messages' __module__: importable, so they pickle (Ray's gRPC proxy pickles each request).
                text = text.replace(f"'ln3diff.v1.{stem}_pb2'", f"'serve.ln3diff.v1.{stem}_pb2'")
                target = out_dir / f"{stem}{suffix}"
                target.write_text(text)
                written.append(target)
    return written


def stale_files(out_dir: Path = OUT) -> list[str]:
    """Names of committed stubs that differ from what protoc generates now (empty when current)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [f.name for f in fresh
                if not (out_dir / f.name).is_file() or (out_dir / f.name).read_bytes() != f.read_bytes()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the committed stubs are current")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale generated stubs: {', '.join(stale)}; run python -m serve.codegen", file=sys.stderr)
            return 1
        print("generated stubs are current")
        return 0
    for path in generate(OUT):
        print(f"wrote {path.relative_to(SERVE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build the Blender add-on as an installable zip: `python -m serve.blender_addon --out ln3diff_blender.zip`.

The zip holds the add-on (examples/blender/ln3diff_blender.py as the package's __init__.py) and, under
vendor/, the client with everything it imports from this project: `serve.client`, the generated
ln3diff.v1 stubs and `ln3diff_rt.options` (torch-free). Blender's Python then needs only grpcio and
protobuf (one pip step, stated in the add-on's docstring); no checkout on a path.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "ln3diff_blender"
ADDON = ROOT / "examples" / "blender" / "ln3diff_blender.py"
# (path in the repo, path under vendor/): what `serve.client` imports from this project, transitively.
VENDORED = [
    ("serve/client.py", "serve/client.py"),
    ("serve/ln3diff/v1/generator_pb2.py", "serve/ln3diff/v1/generator_pb2.py"),
    ("serve/ln3diff/v1/generator_pb2_grpc.py", "serve/ln3diff/v1/generator_pb2_grpc.py"),
    ("ln3diff_rt/options.py", "ln3diff_rt/options.py"),
]
PACKAGE_INITS = ["serve/__init__.py", "serve/ln3diff/__init__.py", "serve/ln3diff/v1/__init__.py",
                 "ln3diff_rt/__init__.py"]


def build_zip(out: str | Path) -> Path:
    """Write the add-on zip to `out`; returns its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(ADDON, f"{PACKAGE}/__init__.py")
        for source, target in VENDORED:
            z.write(ROOT / source, f"{PACKAGE}/vendor/{target}")
        for init in PACKAGE_INITS:  # empty package markers: the vendored modules import only what is listed
            z.writestr(f"{PACKAGE}/vendor/{init}", "")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.blender_addon", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="ln3diff_blender.zip", help="zip to write (default: %(default)s)")
    args = p.parse_args(argv)
    path = build_zip(args.out)
    print(f"wrote {path}: Blender > Edit > Preferences > Add-ons > Install..., then in Blender's Python: "
          "python -m pip install grpcio grpcio-health-checking protobuf", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

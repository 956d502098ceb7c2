"""Console entry points of the `serve` extra: one line naming the extra when it is not installed.

`ln3diff-serve` and `ln3diff-client` need grpcio and protobuf, which the core install leaves out; the
modules behind them import grpc at the top, so the check runs here, before they are imported.
`ln3diff-serve --ray ADDRESS` runs the same service as a Ray Serve application (`serve.ray_app`, the
cluster extra); without `--ray` nothing imports Ray.
"""

from __future__ import annotations

import importlib.util
import sys

MISSING = "{command} needs the serve extra (grpcio, protobuf): pip install 'ln3diff-rt[serve]'"
MISSING_RAY = "ln3diff-serve --ray needs the cluster extra (ray[serve,data]): pip install 'ln3diff-rt[cluster]'"


def _require_grpc(command: str) -> None:
    if importlib.util.find_spec("grpc") is None or importlib.util.find_spec("google.protobuf") is None:
        print(MISSING.format(command=command), file=sys.stderr)
        raise SystemExit(2)


def server() -> int:
    _require_grpc("ln3diff-serve")
    if any(arg == "--ray" or arg.startswith("--ray=") for arg in sys.argv[1:]):
        if importlib.util.find_spec("ray") is None:
            print(MISSING_RAY, file=sys.stderr)
            raise SystemExit(2)
        from serve.ray_app import main as ray_main

        return ray_main()
    from serve.__main__ import main

    return main()


def client() -> int:
    _require_grpc("ln3diff-client")
    from serve.client import main

    return main()

"""`ln3diff` command line: thin parsing over functions that tests call too."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ln3diff", description="LN3Diff runtime: text -> 3D assets.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("presets", help="print parameter counts and latent / tri-plane shapes of each preset")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "presets":
        from ln3diff_rt.presets import presets_table

        print(presets_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())

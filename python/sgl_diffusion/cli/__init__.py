"""The `sgl-diffusion` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import generate, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sgl-diffusion", description="Image and video diffusion inference.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    generate.add_parser(commands)
    serve.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; the request was cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``python -m sgl_diffusion.testing NAME OUT_DIR [--max-shard-size 100KB]``"""

from __future__ import annotations

import argparse
import sys

from sgl_diffusion.testing import FIXTURES, build_fixture


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sgl_diffusion.testing",
        description="Build a tiny random diffusers pipeline (offline, deterministic).",
    )
    parser.add_argument("name", choices=FIXTURES, help="fixture name")
    parser.add_argument("out_dir", help="output directory (must not exist or be empty)")
    parser.add_argument(
        "--max-shard-size",
        default=None,
        help='shard safetensors checkpoints, e.g. "100KB" (default: one file per component)',
    )
    args = parser.parse_args(argv)
    path = build_fixture(args.name, args.out_dir, max_shard_size=args.max_shard_size)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

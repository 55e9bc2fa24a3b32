"""The pre-commit hook that refuses files over --max-kb (data, checkpoints, archives belong in
data/ or outputs/, which git ignores). Usage: check_large_files.py [--max-kb N] FILE..."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--max-kb", type=int, default=500, help="the largest size accepted, in KiB (default 500)")
    p.add_argument("files", nargs="*")
    args = p.parse_args(argv)
    too_big = [
        (f, os.path.getsize(f)) for f in args.files if os.path.isfile(f) and os.path.getsize(f) > args.max_kb * 1024
    ]
    for f, size in too_big:
        print(f"{f}: {size / 1024:.0f} KB is over the {args.max_kb} KB limit", file=sys.stderr)
    return 1 if too_big else 0


if __name__ == "__main__":
    sys.exit(main())

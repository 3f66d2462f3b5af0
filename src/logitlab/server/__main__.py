"""``python -m logitlab.server [serve flags]``: the same as ``logitlab serve``."""

from __future__ import annotations

import argparse
import sys

from .cli import add_serve_command


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m logitlab.server")
    sub = p.add_subparsers(dest="command")
    add_serve_command(sub)
    args = p.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

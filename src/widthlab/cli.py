"""Command line: parse, validate, call one function. See DESIGN.md for the contract."""

from __future__ import annotations

import argparse
import sys

from widthlab import __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="widthlab", description="How wide should this network be?")
    p.add_argument("--version", action="version", version=f"widthlab {__version__}")
    p.add_subparsers(dest="command", metavar="COMMAND")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``muonkit`` command: its parser and the one-line handling of bad input. The subcommands live in
``muonkit.commands`` (``compare``: demo and train; ``coeffs``; ``theory``; ``describe``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .commands._args import UsageError

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="muonkit", description="The Muon optimizer and its tools.")
    parser.add_argument("--version", action="version", version=f"muonkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from .commands import coeffs, compare, describe, theory

    compare.add_parsers(sub)
    coeffs.add_parser(sub)
    theory.add_parser(sub)
    describe.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (UsageError, OSError) as err:  # OSError: a path or checkpoint that cannot be written or read
        print(f"muonkit {args.command}: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        if args.command not in ("coeffs", "theory", "describe"):  # input errors there, not bugs
            raise
        print(f"muonkit {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"muonkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

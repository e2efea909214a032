"""The ``kvhost`` command: argument parsing and output only; the work is in the library.

Each subcommand lives in a small module of :mod:`kvhost.commands` that exposes
``register(subparsers)``; the parser it adds carries a ``func(args) -> int`` default.
Errors of kvhost's own exception tree become one line on stderr and an exit status:
2 for usage and version errors (the operator can fix the input), 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kvhost import __version__
from kvhost.errors import KvhostError, UsageError, VersionError

#: modules of kvhost.commands, in the order their subcommands appear in --help
COMMAND_MODULES: tuple[str, ...] = ("probe", "versions", "host", "libvirt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvhost",
        description="Kernel vhost-net as a versioned backend: probe the kernel, publish "
        "interface versions, pin VMs to one.",
    )
    parser.add_argument("--version", action="version", version=f"kvhost {__version__}")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"kvhost.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (UsageError, VersionError) as err:
        print(f"kvhost {args.subcommand}: {err}", file=sys.stderr)
        return 2
    except KvhostError as err:
        print(f"kvhost {args.subcommand}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

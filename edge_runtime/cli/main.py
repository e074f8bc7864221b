"""Entry point: parse the subcommand, run it, turn the runtime's own errors into one clear line."""

from __future__ import annotations

import argparse
import sys

from edge_runtime import __version__
from edge_runtime.cli import adapt, bench, demo, evaluate, export, train
from edge_runtime.errors import EdgeRuntimeError

SUBCOMMANDS = {"train": train, "evaluate": evaluate, "demo": demo, "adapt": adapt, "bench": bench, "export": export}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-runtime", description=(
        "Novelty detection and 9+1 one-class continual learning for edge GPUs."))
    parser.add_argument("--version", action="version", version=f"edge-runtime {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except EdgeRuntimeError as exc:
        print(f"edge-runtime {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edge-runtime {args.command}: interrupted; saved state and checkpoints are intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

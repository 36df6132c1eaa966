"""The ``calplug`` command. Each subcommand is a module with ``add_arguments(parser)`` and
``run(args) -> int``, imported only when that subcommand runs (so ``calplug --help`` is instant)."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    # name: (module, one-line help)
    "demo": ("calplug.cli.demo", "miniature of the paper's noise-robustness result (the main job)"),
    "inspect": ("calplug.cli.inspect", "token heat map (HTML) and gap histogram (PNG) for a model and samples"),
    "bench": ("calplug.cli.bench", "time and memory of plain, CAL default and CAL faithful steps"),
    "patch": ("calplug.cli.patch", "list / apply / reverse the patch files for LLaVA-family forks"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calplug", description="Contrastive ALignment (CAL) for vision-language training.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _version() -> str:
    from .. import __version__

    return f"calplug {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        args = parser.parse_args(argv)
        parser.print_help()
        return 0 if args.command is None and not argv else 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"calplug {name}", description=help_text)
    module.add_arguments(sub)
    return int(module.run(sub.parse_args(rest)) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

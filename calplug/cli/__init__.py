"""The ``calplug`` command. Each subcommand is a module with ``add_arguments(parser)`` and
``run(args) -> int``, imported only when that subcommand runs (so ``calplug --help`` is instant).

Failures a user can fix (calplug's own errors, and OS errors such as an unwritable folder) end
as one line on stderr and exit status 2; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import CALError

COMMANDS = {
    # name: (module, one-line help)
    "demo": ("calplug.cli.demo", "miniature of the paper's noise-robustness result (the main job)"),
    "inspect": ("calplug.cli.inspect", "per token the gap, clamped and pooled CAL weight (printed, HTML, PNG)"),
    "bench": ("calplug.cli.bench", "time and memory of plain, CAL default and CAL faithful steps"),
    "patch": ("calplug.cli.patch", "list / apply / reverse the patch files for LLaVA-family forks"),
    "audit": ("calplug.cli.audit", "rank a dataset's samples by how much the image supports their answers (scores, HTML, filter)"),
    "audit-bench": ("calplug.cli.audit_bench", "the audit's samples/s and its time against a plain no-grad forward"),
    "verify": ("calplug.cli.verify", "check calplug on your own model and batch: the family tests' checks, pass/fail"),
    "generate": ("calplug.cli.generate", "a model's plain and contrastive (image-blind contrast) answers side by side"),
    "llamafactory": ("calplug.cli.llamafactory", "LLaMA-Factory training with CAL: calplug llamafactory train cfg.yaml"),
    "swift-plugin": ("calplug.cli.swift_plugin", "print the path of the ms-swift plugin file (--external_plugins)"),
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
    sub.add_argument("--debug", action="store_true",
                     help="show the full traceback when the command fails")
    args = sub.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except (CALError, OSError) as error:
        if args.debug:
            raise
        print(f"calplug {name}: error: {one_line(error)}", file=sys.stderr)
        return 2


def one_line(error: BaseException) -> str:
    """An error as one line: its message, with the file name OS errors carry."""
    if isinstance(error, OSError) and not isinstance(error, CALError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    raise SystemExit(main())

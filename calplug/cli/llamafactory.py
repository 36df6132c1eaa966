"""``calplug llamafactory train cfg.yaml [key=value ...]``: LLaMA-Factory's training with CAL set in
its YAML (``cal: true``, ``cal_alpha: ...``); `calplug.frameworks.llamafactory` does the work.

This module is also the entry for several processes, which torchrun starts:
``torchrun --nproc_per_node N -m calplug.cli.llamafactory train cfg.yaml``.
"""
from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=["train"], help="what to run (LLaMA-Factory's train)")
    parser.add_argument("config", help="LLaMA-Factory YAML or JSON config, with cal: true and cal_* settings")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides, as llamafactory-cli takes them (cal_alpha=0.5 too)")


def run(args) -> int:
    from ..frameworks import llamafactory

    return llamafactory.train(args.config, args.overrides)


if __name__ == "__main__":  # python -m calplug.cli.llamafactory train cfg.yaml (under torchrun)
    from . import main

    raise SystemExit(main(["llamafactory", *sys.argv[1:]]))

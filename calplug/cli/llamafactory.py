"""``calplug llamafactory train cfg.yaml [key=value ...]``: LLaMA-Factory's training with CAL set in
its YAML (``cal: true``, ``cal_alpha: ...``). The work is done by `calplug.frameworks.llamafactory`,
which is also the entry for several processes:
``torchrun --nproc_per_node N -m calplug.frameworks.llamafactory train cfg.yaml``."""
from __future__ import annotations

from ..frameworks import llamafactory


def add_arguments(parser) -> None:
    llamafactory.add_arguments(parser)


def run(args) -> int:
    llamafactory.train(args.config, args.overrides)
    return 0

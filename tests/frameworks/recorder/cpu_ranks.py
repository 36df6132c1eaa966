"""Test-only shims that let a framework's multi-process launch run its ranks on CPUs over gloo,
where the framework itself assumes one GPU per rank. `sitecustomize` applies them in every rank
when ``CALPLUG_TEST_CPU_RANKS`` names the framework. They change where a rank's model lives and
how its process group is made, nothing of how the framework trains; on GPUs none is needed.
(tests/distributed/_trainer_worker.py has the same kind of shim for accelerate's FSDP.)
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys


class _AfterImport(importlib.abc.MetaPathFinder):
    """Run ``patch(module)`` right after ``name`` is executed, before anyone imports from it."""

    def __init__(self, name, patch):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        loader, patch = spec.loader, self.patch

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                patch(module)

        spec.loader = Loader()
        sys.meta_path.remove(self)
        return spec


def axolotl() -> None:
    """axolotl 0.19 with WORLD_SIZE > 1:

    * ``normalize_config`` sets ``device_map = {"": LOCAL_RANK}`` (axolotl/utils/config/__init__.py),
      a CUDA device index: on a CPU rank transformers fails to load the model ("Cannot access
      accelerator device when none is available"). The shim maps it to the CPU.

    (axolotl has no ``use_cpu`` key: the tests set accelerate's ``ACCELERATE_USE_CPU=true``, which
    the HF Trainer reads as ``use_cpu``, so that its ranks join a gloo process group; not under
    DeepSpeed, whose process group accelerate makes only without ``cpu``.)
    """
    if "LOCAL_RANK" not in os.environ:
        return  # the launcher, not a rank

    def cpu_device_map(module):
        original = module.normalize_config

        def normalize_config(cfg):
            original(cfg)
            if cfg.device_map is not None and not cfg.device.startswith(("cuda", "npu", "mps")):
                cfg.device_map = {"": "cpu"}

        module.normalize_config = normalize_config

    sys.meta_path.insert(0, _AfterImport("axolotl.utils.config", cpu_device_map))


SHIMS = {"axolotl": axolotl}

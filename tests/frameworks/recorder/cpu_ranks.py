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

    * under DeepSpeed (the ``deepspeed:`` key), accelerate >= 1.13 counts one process on CPU ranks:
      see `deepspeed_cpu_ranks`.

    (axolotl has no ``use_cpu`` key: the DDP tests set accelerate's ``ACCELERATE_USE_CPU=true``,
    which the HF Trainer reads as ``use_cpu``, so that its ranks join a gloo process group. The
    DeepSpeed tests must not: with ``cpu`` accelerate leaves DeepSpeed out and the Trainer runs
    DDP without a word.)
    """
    if "LOCAL_RANK" not in os.environ:
        return  # the launcher, not a rank
    deepspeed_cpu_ranks()

    def cpu_device_map(module):
        original = module.normalize_config

        def normalize_config(cfg):
            original(cfg)
            if cfg.device_map is not None and not cfg.device.startswith(("cuda", "npu", "mps")):
                cfg.device_map = {"": "cpu"}

        module.normalize_config = normalize_config

    sys.meta_path.insert(0, _AfterImport("axolotl.utils.config", cpu_device_map))


def deepspeed_cpu_ranks() -> None:
    """DeepSpeed under the HF Trainer on CPU ranks, accelerate 1.13 and later: its process state
    (``PartialState._prepare_backend``) picks a process group backend for a launched process (with
    ``LOCAL_RANK``) only on an accelerator, or on the CPU when asked for ``cpu``; with neither it
    has no backend and counts one process (accelerate's "Remove ipex" change, #3883: before 1.13 a
    launched process without an accelerator got gloo). But ``cpu`` also turns DeepSpeed off, so on
    CPU ranks accelerate's DeepSpeed state always says one process while DeepSpeed's process group
    (``DS_ACCELERATOR=cpu``) has them all, and the Trainer's ``"auto"`` batch sizes stop
    DeepSpeed's check (``train_batch_size ... 2 != 2 * 1 * 2``).

    The shim gives such a rank, when DeepSpeed is on (``ACCELERATE_USE_DEEPSPEED``) and accelerate
    found no backend, what accelerate gives a ``cpu`` rank (gloo, its rank and world size): the
    behaviour of accelerate 1.12. DeepSpeed then still makes the process group and the engine;
    on GPU ranks accelerate picks nccl and the shim does nothing.
    """
    def count_deepspeed_ranks(module):
        cls = module.PartialState
        original = cls._prepare_backend

        def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
            chosen, kind = original(self, cpu, sagemaker_dp, backend)
            if (chosen is None and not cpu and int(os.environ.get("LOCAL_RANK", -1)) != -1
                    and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"):
                return original(self, True, sagemaker_dp, backend)
            return chosen, kind

        cls._prepare_backend = _prepare_backend

    sys.meta_path.insert(0, _AfterImport("accelerate.state", count_deepspeed_ranks))


SHIMS = {"axolotl": axolotl}

"""LLaMA-Factory: ``calplug llamafactory train cfg.yaml [key=value ...]``.

LLaMA-Factory has no plugin hook and rejects unknown YAML keys, so calplug runs it: the YAML (and
``key=value`` overrides, read by LLaMA-Factory's own ``read_args``) loses its ``cal`` / ``cal_*``
keys, the options CAL cannot run with are refused (`REFUSED`), and the rest goes to
``llamafactory.train.tuner.run_exp(args, callbacks)`` with a callback that enables CAL on the
model when training begins and calplug's logging callback.

Several processes: ``llamafactory-cli`` relaunches its own launcher with torchrun when it sees
several GPUs (or ``FORCE_TORCHRUN=1``), and those processes never get calplug's callback. So
``calplug llamafactory train`` relaunches itself the same way, with LLaMA-Factory's variables
(`torchrun_command`): ``FORCE_TORCHRUN=1 NPROC_PER_NODE=2 calplug llamafactory train cfg.yaml``
starts ``torchrun ... -m calplug.cli.llamafactory train cfg.yaml``, which can also be run by hand.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping

from . import NOT_SFT, OWN_LOSS, PACKING, Refusal, is_on, liger, refuse, settings_from
from ..enabling import checked_config
from ..errors import CALConfigError
from ..trainer import CALLoggingCallback, put_first

FRAMEWORK = "LLaMA-Factory"

REFUSED = (
    Refusal("stage", NOT_SFT, applies=lambda v: v != "sft", off="sft"),
    Refusal("use_dft_loss", "DFT " + OWN_LOSS),
    Refusal("use_eaft_loss", "EAFT " + OWN_LOSS),
    Refusal("use_asft_loss", "ASFT replaces the model's loss with its own, computed from the "
                             "logits and a reference model, so the CAL loss would be discarded"),
    Refusal("packing", PACKING),
    Refusal("neat_packing", PACKING),
    Refusal("label_smoothing_factor", "label smoothing " + OWN_LOSS, off="0"),
    Refusal("enable_liger_kernel", "LLaMA-Factory applies Liger with Liger's defaults, which include "
                                   "the fused_linear_cross_entropy kernel, and has no setting to leave "
                                   "it out: that kernel " + liger.WHY["fused_linear_cross_entropy"]
            + ". Liger's other kernels compose with CAL through the Trainer's own switch: "
              "use_liger_kernel: true with " + liger.YAML_OFF),
    Refusal("use_unsloth", "Unsloth replaces the model's forward and loss with its own kernels, "
                           "which calplug is not tested with"),
    Refusal("use_mca", "Megatron-Core training runs its own model code, which calplug does not patch"),
    Refusal("use_hyper_parallel", "hyper-parallel training runs its own model code, which "
                                  "calplug does not patch"),
)


def split_config(values: Mapping[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """``(calplug settings, or None when CAL is off; LLaMA-Factory's own arguments)``."""
    rest = {k: v for k, v in values.items() if not (k == "cal" or str(k).startswith("cal_"))}
    settings = settings_from(values, FRAMEWORK)
    if not is_on(values.get("cal")):
        return None, rest
    return settings, rest


class LlamaFactoryCALCallback(CALLoggingCallback):
    """Enables CAL on the model when training begins (LoRA and other wrappers are looked
    through) and logs calplug's ``cal/`` keys, ahead of the reporting callbacks."""

    def __init__(self, settings: dict[str, Any]):
        super().__init__()
        self.settings = dict(settings)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from ..enabling import enable

        enable(model, **self.settings)
        handler = _calling_handler()
        if handler is not None:  # reporters (TensorBoard, wandb) come before user callbacks
            put_first(handler, self)
        super().on_train_begin(args, state, control, **kwargs)


def _calling_handler():
    """The transformers ``CallbackHandler`` that is calling the current callback, found in the
    calling frames: LLaMA-Factory builds the trainer itself and hands callbacks nothing to reach
    it by, and a callback must run before the reporting callbacks to add keys to their logs."""
    from transformers.trainer_callback import CallbackHandler

    frame = sys._getframe(1)
    for _ in range(6):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, CallbackHandler):
            return candidate
        frame = frame.f_back
    return None


def _enabled(name: str) -> bool:
    """An environment switch as LLaMA-Factory reads it ("true", "y" or "1")."""
    return os.environ.get(name, "0").strip().lower() in ("true", "y", "1")


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no CUDA build
        return 0


def torchrun_command(config: str, overrides=()) -> list[str] | None:
    """The torchrun command `train` relaunches itself with, where ``llamafactory-cli train`` would
    relaunch itself (``FORCE_TORCHRUN=1``, or several GPUs visible), with the same variables
    (``NNODES``, ``NODE_RANK``, ``NPROC_PER_NODE``, ``MASTER_ADDR``, ``MASTER_PORT``); None in a
    process torchrun started (``LOCAL_RANK`` set) or when one process is to train.

    Why calplug relaunches itself rather than leaving it to LLaMA-Factory: ``llamafactory-cli``
    relaunches its own launcher module, whose processes never get calplug's callback."""
    if "LOCAL_RANK" in os.environ:
        return None
    gpus = _gpu_count()
    if not (_enabled("FORCE_TORCHRUN") or gpus > 1):
        return None
    if os.environ.get("RDZV_ID"):
        raise CALConfigError(
            "RDZV_ID is set: calplug llamafactory does not start elastic (rendezvous) launches. Start "
            "torchrun yourself: torchrun --rdzv-id ... -m calplug.cli.llamafactory train CONFIG.yaml")
    import socket

    port = os.environ.get("MASTER_PORT")
    if not port:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
    return [sys.executable, "-m", "torch.distributed.run",
            "--nnodes", os.environ.get("NNODES", "1"),
            "--node_rank", os.environ.get("NODE_RANK", "0"),
            "--nproc_per_node", os.environ.get("NPROC_PER_NODE", str(max(gpus, 1))),
            "--master_addr", os.environ.get("MASTER_ADDR", "127.0.0.1"),
            "--master_port", port,
            "-m", "calplug.cli.llamafactory", "train", str(config), *map(str, overrides)]


def read_config(config: str, overrides=()) -> dict[str, Any]:
    """The arguments ``llamafactory-cli train CONFIG key=value ...`` would run with: the YAML or
    JSON file merged with the overrides, read as LLaMA-Factory's ``read_args`` reads them."""
    import json

    from omegaconf import OmegaConf

    path = Path(config).absolute()
    if not path.is_file():
        raise CALConfigError(f"LLaMA-Factory config {config!r} does not exist")
    if path.suffix in (".yaml", ".yml"):
        base = OmegaConf.load(path)
    elif path.suffix == ".json":
        base = OmegaConf.create(json.loads(path.read_text()))
    else:
        raise CALConfigError(f"LLaMA-Factory config {config!r}: expected a .yaml, .yml or .json file")
    return OmegaConf.to_container(OmegaConf.merge(base, OmegaConf.from_cli(list(overrides))))


def train(config: str, overrides=()) -> int:
    """Run LLaMA-Factory's training on ``config`` (YAML or JSON) with ``key=value`` overrides,
    CAL enabled when the config says ``cal: true``; returns the exit status. Refusals come before
    LLaMA-Factory loads; where ``llamafactory-cli`` would relaunch itself with torchrun
    (`torchrun_command`), this relaunches ``python -m calplug.cli.llamafactory`` instead."""
    values = read_config(config, overrides)
    settings, rest = split_config(values)
    callbacks = []
    if settings is not None:
        refuse(FRAMEWORK, REFUSED, rest)
        if is_on(rest.get("use_liger_kernel")):  # the Trainer's own switch: layer kernels compose
            liger.check_kernel_config(FRAMEWORK, "use_liger_kernel=True", rest.get("liger_kernel_config"),
                                      liger.YAML_OFF)
        checked_config(None, **settings)  # a bad value fails now, not when training begins
        callbacks = [LlamaFactoryCALCallback(settings)]
    command = torchrun_command(config, overrides)
    if command is not None:
        import subprocess

        print(f"calplug llamafactory: torchrun {' '.join(command[3:])}", flush=True)  # python -m torch.distributed.run
        return subprocess.run(command).returncode
    from llamafactory.train.tuner import run_exp

    run_exp(rest, callbacks=callbacks)
    return 0

"""LLaMA-Factory: ``calplug llamafactory train cfg.yaml [key=value ...]``.

LLaMA-Factory has no plugin hook and rejects unknown YAML keys, so calplug runs it: the YAML (and
``key=value`` overrides, read by LLaMA-Factory's own ``read_args``) loses its ``cal`` / ``cal_*``
keys, the options CAL cannot run with are refused (`REFUSED`), and the rest goes to
``llamafactory.train.tuner.run_exp(args, callbacks)`` with a callback that enables CAL on the
model when training begins and calplug's logging callback.

Several processes: ``llamafactory-cli`` relaunches itself with torchrun when it sees several
GPUs, and the relaunched processes lose the callbacks. Launch torchrun yourself instead:
``torchrun --nproc_per_node N -m calplug.cli.llamafactory train cfg.yaml`` (the command as a
module). Without torchrun and with several GPUs visible, `train` refuses to start (the Trainer
would fall back to ``nn.DataParallel``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping

from . import LIGER, NOT_SFT, OWN_LOSS, PACKING, Refusal, is_on, refuse, settings_from
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
    Refusal("enable_liger_kernel", LIGER),
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


def _refuse_data_parallel() -> None:
    if "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ:
        return
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no CUDA build
        gpus = 0
    if gpus > 1:
        raise CALConfigError(
            f"{gpus} GPUs are visible and this is one process: the Trainer would use nn.DataParallel, "
            "which calplug cannot run under. Launch one process per GPU: torchrun --nproc_per_node "
            f"{gpus} -m calplug.cli.llamafactory train CONFIG.yaml (or make one GPU visible "
            "with CUDA_VISIBLE_DEVICES)"
        )


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


def train(config: str, overrides=()) -> None:
    """Run LLaMA-Factory's training on ``config`` (YAML or JSON) with ``key=value`` overrides,
    CAL enabled when the config says ``cal: true``. Refusals come before LLaMA-Factory loads."""
    values = read_config(config, overrides)
    settings, rest = split_config(values)
    callbacks = []
    if settings is not None:
        refuse(FRAMEWORK, REFUSED, rest)
        _refuse_data_parallel()
        checked_config(None, **settings)  # a bad value fails now, not when training begins
        callbacks = [LlamaFactoryCALCallback(settings)]
    from llamafactory.train.tuner import run_exp

    run_exp(rest, callbacks=callbacks)

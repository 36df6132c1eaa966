"""CAL as a setting of the training frameworks people fine-tune VLMs with: axolotl, LLaMA-Factory
and ms-swift. One module per framework; each imports its framework only when it is used.

No framework's custom-loss hook can carry CAL: those hooks see ``(outputs, labels,
num_items_in_batch)``, not the inputs, so the contrast pass cannot run there, and several of them
take ``labels`` out of the model call, which turns calplug off. What works in all three is
enabling CAL on the model once it is loaded (`calplug.enable`), plus calplug's logging callback.
So each adapter reads ``cal`` / ``cal_<setting>`` from the framework's config, refuses the options
that change the loss path or pack samples (`Refusal`), enables CAL, and logs ``cal/...`` keys.
How to use each: docs/frameworks.md.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from ..config import did_you_mean, field_names
from ..errors import CALConfigError
from ..hookspecs import Framework, hookimpl
from .liger import LIGER_KERNEL
from .trl import TRL

SETTING_PREFIX = "cal_"


def settings_from(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """calplug settings from a framework's flat config: ``cal_<setting>: value`` for every
    `calplug.CALConfig` field (``cal_alpha``, ``cal_pool_window``, ...); unset (None) values are
    left out, so ``$CALPLUG_CONFIG`` or the defaults fill them. An unknown ``cal_*`` key is an
    error naming the closest setting."""
    known = field_names()
    settings = {}
    for key, value in values.items():
        if not isinstance(key, str) or not key.startswith(SETTING_PREFIX) or value is None:
            continue
        name = key[len(SETTING_PREFIX):]
        if name not in known:
            hint = did_you_mean(key, [SETTING_PREFIX + k for k in known])
            raise CALConfigError(
                f"{source}: unknown calplug setting {key!r}.{hint} Settings: cal (on/off), "
                f"{', '.join(SETTING_PREFIX + k for k in known)}."
            )
        settings[name] = value
    return settings


def is_on(value: Any) -> bool:
    """A framework option that is set: not None, False, 0 or an empty string."""
    return value not in (None, False, 0, 0.0, "", "false", "False", "none", "None")


@dataclasses.dataclass(frozen=True)
class Refusal:
    """An option CAL cannot run with: ``option`` in the framework's own spelling, ``applies`` says
    whether a value of it is refused, ``why`` says what would go wrong, ``off`` what to set."""

    option: str
    why: str
    applies: Callable[[Any], bool] = is_on
    off: str = "false"


def refuse(framework: str, refusals: tuple[Refusal, ...], values: Mapping[str, Any]) -> None:
    """Raise `CALConfigError` for the first refused option set in ``values`` (a mapping of the
    framework's options), naming the option, why CAL cannot run with it, and the fix."""
    for refusal in refusals:
        value = values.get(refusal.option)
        if value is not None and refusal.applies(value):
            raise CALConfigError(
                f"{framework}: CAL cannot run with {refusal.option}={value!r}: {refusal.why}. "
                f"Set {refusal.option} to {refusal.off}, or turn CAL off (cal: false)."
            )


# Reasons shared by the adapters.
PACKING = ("it packs several samples into one row, and CAL's contrast pass and pooling would mix "
           "them (calplug needs one sample per row)")
OWN_LOSS = ("computes the loss outside the model from (outputs, labels) and takes labels out of "
            "the model call, so calplug's forward would never see them and CAL would silently do "
            "nothing")
NOT_SFT = "CAL is a supervised fine-tuning loss; preference / RL / reward trainers compute their own"



# What the CAL step needs to know about each framework that calls the model (packed batches are
# refused naming these options; TRL's own-loss trainers and fused head): registered through the
# `calplug_frameworks` hook, so the core never imports this package.
FRAMEWORKS = [
    Framework("axolotl", packing_off="sample_packing: false and batch_flattening: false"),
    Framework("LLaMA-Factory", packing_off="packing: false, neat_packing: false"),
    TRL,
    Framework("ms-swift", packing_off="--packing false --padding_free false"),
    LIGER_KERNEL,
]


@hookimpl
def calplug_frameworks():
    return FRAMEWORKS

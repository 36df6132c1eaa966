"""axolotl: CAL as a plugin, switched on in the YAML.

    plugins:
      - calplug.frameworks.axolotl.CALPlugin
    cal: true
    cal_alpha: 1.0          # any CALConfig setting as cal_<name>; unset ones: $CALPLUG_CONFIG or defaults

`CALArgs` adds ``cal`` and ``cal_<setting>`` (every `calplug.CALConfig` field) to axolotl's config
schema; its validator refuses, when ``cal`` is on, the options CAL cannot run with (`REFUSED`), at
config load, before any data is prepared. `CALPlugin.post_model_load` enables CAL on the model
axolotl built (adapters included) and `CALPlugin.post_trainer_create` puts calplug's logging
callback ahead of the reporters. axolotl >= 0.21 also loads installed plugins from the
``axolotl.plugins`` entry point, which calplug's package declares, without a ``plugins:`` line; the
plugin does nothing unless ``cal: true``.

Beware: axolotl drops YAML keys that no loaded plugin declares without a word, and logs (rather than
raises) a plugin that fails to import. ``cal: true`` without the ``plugins:`` line (on < 0.21), or
with calplug not installed, trains plain cross-entropy; the log then has no ``cal/`` keys.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from pydantic import BaseModel, create_model, model_validator

from axolotl.integrations.base import BasePlugin

from . import NOT_SFT, OWN_LOSS, PACKING, Refusal, liger, refuse, settings_from
from ..config import CALConfig

FRAMEWORK = "axolotl"

REFUSED = (
    Refusal("rl", NOT_SFT, off="null (supervised fine-tuning)"),
    Refusal("reward_model", NOT_SFT),
    Refusal("process_reward_model", NOT_SFT),
    Refusal("orpo_alpha", "ORPO computes its own loss from the logits, so the CAL loss would be "
                          "discarded", off="null"),
    Refusal("use_eaft", "EAFT " + OWN_LOSS),
    Refusal("chunked_cross_entropy", "it replaces transformers' causal-LM loss, and calplug computes "
                                     "its own weighted loss in the model's forward: the option "
                                     "would do nothing for the CAL loss"),
    Refusal("liger_fused_linear_cross_entropy", "that Liger kernel "
            + liger.WHY["fused_linear_cross_entropy"] + ". Liger's other kernels (liger_rope, "
            "liger_rms_norm, liger_glu_activation, liger_layer_norm) compose with CAL, and for the "
            "memory it saves set cal_loss_chunk: 1024"),
    Refusal("liger_cross_entropy", "that Liger kernel " + liger.WHY["cross_entropy"] + ". Liger's "
            "other kernels (liger_rope, liger_rms_norm, liger_glu_activation, liger_layer_norm) "
            "compose with CAL"),
    Refusal("cut_cross_entropy", "Cut Cross-Entropy computes the loss without logits inside the "
                                 "model's forward"),
    Refusal("sample_packing", PACKING),
    Refusal("batch_flattening", PACKING),
    Refusal("context_parallel_size", "it splits each sequence across ranks, and the contrast pass "
                                     "needs the whole sequence", applies=lambda v: v > 1, off="1"),
    Refusal("sequence_parallel_degree", "it splits each sequence across ranks, and the contrast "
                                        "pass needs the whole sequence", applies=lambda v: v > 1,
            off="1"),
    Refusal("torch_compile", "calplug's step decides per batch how to run its contrast pass, which "
                             "a compiled model cannot trace"),
)

_TYPES = {"float": float, "int": int, "str": str, "bool": bool}


def _setting_fields() -> dict[str, Any]:
    """``cal_<name>: Optional[type] = None`` for every CALConfig field."""
    fields = {}
    for field in dataclasses.fields(CALConfig):
        kind = _TYPES[field.type if isinstance(field.type, str) else field.type.__name__]
        fields[f"cal_{field.name}"] = (Optional[kind], None)
    return fields


class _CALSwitch(BaseModel):
    cal: bool = False

    @model_validator(mode="after")
    def _refuse_incompatible(self):
        if self.cal:
            settings = {name: getattr(self, name) for name in type(self).model_fields
                        if name.startswith("cal_")}
            from ..enabling import checked_config

            checked_config(None, **settings_from(settings, FRAMEWORK))  # bad values fail here, early
            refuse(FRAMEWORK, REFUSED, _Options(self))
        return self


class _Options:
    """axolotl's validated options by name (``None`` when a field does not exist: options of
    plugins that are not loaded)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def get(self, name, default=None):
        return getattr(self.cfg, name, default)


CALArgs = create_model("CALArgs", __base__=_CALSwitch, __module__=__name__, **_setting_fields())
CALArgs.__doc__ = ("axolotl config keys of calplug: ``cal`` (off by default) and ``cal_<setting>`` "
                   "for every CALConfig field, merged into axolotl's schema when the plugin loads.")


class CALPlugin(BasePlugin):
    """axolotl plugin: enables CAL on the loaded model when the config says ``cal: true``."""

    def get_input_args(self) -> str:
        return f"{__name__}.CALArgs"

    def post_model_load(self, cfg, model):
        if not cfg.get("cal"):
            return
        from ..enabling import enable

        enable(model, **settings_from(dict(cfg), FRAMEWORK))

    def post_trainer_create(self, cfg, trainer):
        if not cfg.get("cal"):
            return
        from .. import trainer as cal_trainer

        cal_trainer.refuse_bypasses(trainer)
        cal_trainer.use_model_loss(trainer)
        cal_trainer.attach(trainer)

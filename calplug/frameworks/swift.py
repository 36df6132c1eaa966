"""ms-swift: CAL as a callback, loaded from a plugin file.

    CALPLUG_CONFIG=cal.yaml swift sft ... --external_plugins "$(calplug swift-plugin)" --callbacks cal

``--external_plugins FILE`` makes ms-swift import the file (its folder goes on ``sys.path``, so the
file lies in a folder holding nothing else: `plugin_path`); the file registers `SwiftCALCallback`
as ``cal`` in ``swift.callbacks.mapping.callbacks_map``, which ``--callbacks cal`` selects. ms-swift
rejects arguments it does not know, so settings come from the YAML file named by
``$CALPLUG_CONFIG`` (which ``--model_kwargs '{"calplug_config": "cal.yaml"}'`` also sets: ms-swift
exports each model_kwargs key, upper-cased, as an environment variable).

When training begins the callback refuses the options CAL cannot run with (`REFUSED`), turns
``use_logits_to_keep`` off when it was left to ms-swift (CAL weights every position), enables CAL
on the model and logs the ``cal/`` keys ahead of ms-swift's own logging (``logging.jsonl``).

Pre-merged embeddings: for Qwen2-VL, Qwen2.5-VL and other templates with a ``_post_encode`` step,
ms-swift merges the images into ``inputs_embeds`` in a forward pre-hook and drops ``input_ids``,
so calplug cannot read the placeholders. With transformers >= 5.3 the hook keeps
``mm_token_type_ids``, which calplug reads; otherwise the callback wraps the template's
``_post_encode`` so that it also returns the placeholder positions as
`calplug.hookspecs.VISUAL_MASK_ARGUMENT`.
"""
from __future__ import annotations

from pathlib import Path

from . import NOT_SFT, OWN_LOSS, PACKING, Refusal, liger, refuse
from ..errors import CALConfigError, CALWarning, warn_once
from ..hookspecs import VISUAL_MASK_ARGUMENT
from ..integrations import compat
from ..trainer import CALLoggingCallback, put_first

FRAMEWORK = "ms-swift"
CALLBACK_NAME = "cal"
PLUGIN_FILE = Path(__file__).resolve().parent / "swift_plugin" / "calplug_swift.py"

def _arg(name: str):
    return lambda args, template: getattr(args, name, None)


def _template(name: str, default=None):
    return lambda args, template: getattr(template, name, default)


def _loss_scale(args, template):
    """The template's loss scale when it is not binary (None otherwise)."""
    binary = getattr(template, "is_binary_loss_scale", None)
    if binary is None and getattr(template, "_loss_scale", None) is not None:
        binary = template.loss_scale.is_binary_loss_scale
    return None if binary in (None, True) else template._loss_scale


# Each refused option with where ms-swift keeps its value (the trainer's arguments or the template).
_REFUSED_AND_READ = (
    (Refusal("swift rlhf", NOT_SFT + " (run swift sft)", applies=lambda mode: mode != "train",
             off="swift sft"), _template("mode", "train")),
    (Refusal("--task_type", "CAL weights a causal language-model loss",
             applies=lambda t: t not in (None, "causal_lm"), off="causal_lm"), _template("task_type")),
    (Refusal("--loss_type", "a custom loss " + OWN_LOSS, off="unset"), _arg("loss_type")),
    (Refusal("--loss_scale", "a non-binary loss scale " + OWN_LOSS, off="default"), _loss_scale),
    (Refusal("--enable_dft_loss", "DFT " + OWN_LOSS), _arg("enable_dft_loss")),
    (Refusal("--enable_channel_loss", "channel loss " + OWN_LOSS), _arg("enable_channel_loss")),
    (Refusal("--label_smoothing_factor", "label smoothing " + OWN_LOSS, off="0"),
     _arg("label_smoothing_factor")),
    (Refusal("--sequence_parallel_size", "sequence parallelism splits each sequence across ranks "
                                         "(and it " + OWN_LOSS + ")", applies=lambda n: n > 1, off="1"),
     _template("sequence_parallel_size")),
    (Refusal("--packing", PACKING), _template("packing")),
    (Refusal("--padding_free", PACKING), _template("padding_free")),
    (Refusal("--tuner_backend", "Unsloth replaces the model's forward and loss with its own kernels",
             applies=lambda b: b == "unsloth", off="peft"), _arg("tuner_backend")),
    (Refusal("--use_logits_to_keep", "calplug needs the logits of every position to weight the "
                                     "loss", applies=lambda v: v is True, off="false (or leave it unset)"),
     _arg("use_logits_to_keep")),
)
REFUSED = tuple(refusal for refusal, _ in _REFUSED_AND_READ)
LIGER_NOTE = ("calplug: --use_liger_kernel with CAL: Liger's layer kernels (RMSNorm, RoPE, SwiGLU) "
              "are applied, its fused linear cross-entropy is not, because CAL weights each "
              "token's loss and that kernel computes an unweighted one without logits (ms-swift's "
              "command line cannot set liger_kernel_config, so calplug sets it to "
              f"{liger.LAYER_ONLY}). For the memory the fused loss saves, set loss_chunk: 1024 in "
              "$CALPLUG_CONFIG.")
LIGER_OFF = "liger_kernel_config unset (calplug then applies Liger's layer kernels only)"


def plugin_path() -> str:
    """The plugin file for ``--external_plugins``."""
    if not PLUGIN_FILE.is_file():
        raise CALConfigError(f"calplug's ms-swift plugin file is missing ({PLUGIN_FILE}): reinstall calplug")
    return str(PLUGIN_FILE)


def register() -> None:
    """Make ``--callbacks cal`` select `SwiftCALCallback` (what the plugin file runs)."""
    from swift.callbacks.mapping import callbacks_map

    callbacks_map[CALLBACK_NAME] = SwiftCALCallback


def options(args, template) -> dict:
    """The ms-swift options `REFUSED` names, read from the trainer's arguments and template."""
    return {refusal.option: read(args, template) for refusal, read in _REFUSED_AND_READ}


class SwiftCALCallback(CALLoggingCallback):
    """``--callbacks cal``: ms-swift builds it as ``callbacks_map["cal"](args, trainer)`` before
    the Trainer exists. Enables CAL when training begins and logs calplug's ``cal/`` keys."""

    def __init__(self, args, trainer):
        super().__init__()
        self.args = args
        self.trainer = trainer
        self._post_encode = None  # the template's own, while wrapped
        if getattr(args, "use_liger_kernel", False) and not getattr(args, "liger_kernel_config", None):
            # Built before the Trainer, which applies Liger from these arguments: its layer kernels
            # only (ms-swift's command line cannot set liger_kernel_config, a dict).
            args.liger_kernel_config = dict(liger.LAYER_ONLY)
            warn_once("swift_liger", message=LIGER_NOTE, category=CALWarning)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from ..enabling import enable

        trainer = self.trainer
        template = trainer.template
        refuse(FRAMEWORK, REFUSED, options(trainer.args, template))
        if getattr(trainer.args, "use_liger_kernel", False):  # Liger's layer kernels compose
            liger.check_kernel_config(FRAMEWORK, "--use_liger_kernel true",
                                      getattr(trainer.args, "liger_kernel_config", None), LIGER_OFF)
        from ..trainer import loss_owner, refuse_bypasses

        refuse_bypasses(trainer)   # what ms-swift shares with the HF Trainer
        self.loss_owner = loss_owner(trainer)
        if trainer.args.use_logits_to_keep is None:  # decided at the first batch, after this
            trainer.args.use_logits_to_keep = False
        enable(model if model is not None else trainer.model)
        self._carry_visual_positions(template)
        put_first(trainer.callback_handler, self)  # ahead of the printer, logging.jsonl, reporters
        super().on_train_begin(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if self._post_encode is not None:
            self.trainer.template.__dict__.pop("_post_encode", None)
            self._post_encode = None
        super().on_train_end(args, state, control, **kwargs)

    def _carry_visual_positions(self, template) -> None:
        """Make a template that merges images before the forward also say where they went, when
        ``mm_token_type_ids`` will not (transformers < 5.3, or templates that do not send it)."""
        from swift.template import Template

        if type(template)._post_encode is Template._post_encode or "_post_encode" in template.__dict__:
            return
        own = template._post_encode

        def post_encode(model, inputs):
            result = own(model, inputs)
            input_ids = inputs.get("input_ids")
            if ("inputs_embeds" in result and input_ids is not None
                    and inputs.get("mm_token_type_ids") is None
                    and result.get("mm_token_type_ids") is None):
                from ..enabling import unwrap_model

                config = unwrap_model(model).config
                result[VISUAL_MASK_ARGUMENT] = compat.placeholder_positions(config, input_ids)
            return result

        template._post_encode = post_encode
        self._post_encode = own

"""Trainer options that would silently bypass or distort CAL (docs/distributed.md, "Options that
bypass CAL"): each is refused before training, naming the option, or stops the first optimiser
step, naming what happened. The messages are quoted whole: they are the documentation.

Tried as a user would, before these checks: with ``label_smoothing_factor=0.1`` and
``calplug.trainer.enable_for_trainer(trainer)`` the Trainer popped the labels, the enabled forward
never ran its step, and the logged loss was exactly the plain model's smoothed loss
(`test_label_smoothing_really_bypassed_cal_without_the_check` shows that is what it would train).
"""
from __future__ import annotations

import importlib.util
import re
import types

import pytest
import torch

pytest.importorskip("accelerate", reason="the HF Trainer needs accelerate (pip install accelerate): "
                                         "tox -e distributed")

import calplug
from calplug.errors import CALConfigError
from calplug.trainer import CALLoggingCallback, enable_for_trainer, refuse_bypasses

import _hf
from _common import make_model

LABEL_SMOOTHING = (
    "CAL cannot run with label_smoothing_factor=0.1: the Trainer's label smoother takes the labels "
    "out of the model call and computes a smoothed cross-entropy from the logits, so calplug's "
    "forward never runs its step and the loss is the plain model's. Set label_smoothing_factor=0, "
    "or turn CAL off")
COMPUTE_LOSS_FUNC = (
    "CAL cannot run with the Trainer's compute_loss_func: the Trainer takes the labels out of the "
    "model call and computes that function's loss from the logits, so calplug's forward never runs "
    "its step. Build the trainer without compute_loss_func (the model's loss is then the CAL loss), "
    "or turn CAL off")
DISCARDED = (
    "CAL was bypassed: the first training step ran 2 CAL step(s), but no backward pass went through "
    "the CAL loss the model returned: {owner} computed its own loss from the model's outputs and "
    "discarded the model's, so CAL's weights had no effect. Return the model's loss (outputs.loss) "
    "from compute_loss, or turn CAL off")
NO_STEP = (
    "CAL was bypassed: the first training step ran no CAL step on LlavaForConditionalGeneration, so "
    "the loss it optimised is not CAL's. Cause: {owner} called the model without labels (or in eval "
    "mode) and computed the training loss itself{options}. Label smoothing, a compute_loss_func and a "
    "compute_loss that pops the labels all do this: let the model receive the labels and return its "
    "loss (the CAL loss)")
LIGER_FLCE = (
    "Liger Kernel: CAL cannot run with use_liger_kernel=True: Liger's fused_linear_cross_entropy "
    "kernel is on, and it replaces the model's forward with one that computes its own unweighted "
    "cross-entropy without logits, which CAL's per-token weights cannot enter (Liger-Kernel #338): "
    "applied after calplug.enable it removes the CAL step, applied before it saves nothing. Keep "
    "Liger and switch its loss kernels off with liger_kernel_config={\"fused_linear_cross_entropy\": "
    "False, \"cross_entropy\": False}; Liger's other kernels (RMSNorm, RoPE, SwiGLU, LayerNorm) "
    "compose with CAL, and for the memory Liger's fused loss saves, set calplug's loss_chunk (e.g. "
    "1024): CAL's weighted cross-entropy in chunks, without the [B, L, V] logits. Or turn CAL off.")


def trainer_for(tmp_path, cls=None, callbacks=(), **args):
    from transformers import Trainer

    model = make_model()
    cls = cls or Trainer
    return cls(model=model, args=_hf.training_args(tmp_path / "out", **args),
               train_dataset=_hf.samples(model), data_collator=_hf.RecordingCollator(),
               callbacks=list(callbacks))


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -- refused before training ----------------------------------------------------------------------
def test_label_smoothing_is_refused_by_enable_for_trainer(tmp_path):
    trainer = trainer_for(tmp_path, label_smoothing_factor=0.1)
    with pytest.raises(CALConfigError) as refused:
        enable_for_trainer(trainer)
    assert str(refused.value) == LABEL_SMOOTHING
    assert not calplug.is_enabled(trainer.model)     # refused before anything was changed


def test_label_smoothing_really_bypassed_cal_without_the_check(tmp_path):
    """Why the refusal exists: enabled on the model, the Trainer's label smoother pops the labels,
    the forward runs no CAL step, and the first loss is the plain model's smoothed loss."""
    trainer = trainer_for(tmp_path, label_smoothing_factor=0.1)
    calplug.enable(trainer.model)                    # what enable_for_trainer used to do
    batch = _hf.RecordingCollator()(_hf.samples(trainer.model)[:2])
    state = trainer.model.__dict__["_calplug_state"]
    with torch.no_grad():
        smoothed = trainer.compute_loss(trainer.model, dict(batch))
    assert state.loss_use.steps == 0                 # no CAL step ran
    plain = trainer_for(tmp_path, label_smoothing_factor=0.1)   # the same weights, CAL off
    with torch.no_grad():
        want = plain.compute_loss(plain.model, dict(batch))
    assert float(smoothed) == float(want)


def test_label_smoothing_with_cal_enabled_before_the_trainer_stops_at_the_first_step(tmp_path):
    """``calplug.enable(model)`` then a Trainer with label smoothing and calplug's logging
    callback: the first optimiser step raises, naming the option."""
    from transformers import Trainer

    model = calplug.enable(make_model())
    trainer = Trainer(model=model, args=_hf.training_args(tmp_path / "out", label_smoothing_factor=0.1),
                      train_dataset=_hf.samples(model), data_collator=_hf.RecordingCollator(),
                      callbacks=[CALLoggingCallback()])
    with pytest.raises(CALConfigError) as stopped:
        trainer.train()
    assert str(stopped.value) == NO_STEP.format(
        owner="the trainer", options="; set here: label_smoothing_factor=0.1")
    assert trainer.state.global_step == 1            # the first step, not later


def test_compute_loss_func_is_refused(tmp_path):
    from transformers import Trainer

    model = make_model()
    trainer = Trainer(model=model, args=_hf.training_args(tmp_path / "out"),
                      train_dataset=_hf.samples(model), data_collator=_hf.RecordingCollator(),
                      compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum())
    with pytest.raises(CALConfigError) as refused:
        enable_for_trainer(trainer)
    assert str(refused.value) == COMPUTE_LOSS_FUNC


# -- custom compute_loss: caught at the first step ------------------------------------------------
def _own_cross_entropy(outputs, labels):
    logits = outputs.logits[:, :-1].flatten(0, 1)
    return torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100)


def test_a_compute_loss_that_discards_the_model_loss_stops_at_the_first_step(tmp_path):
    from transformers import Trainer

    class OwnLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)                    # CAL runs; its loss is thrown away
            return _own_cross_entropy(outputs, inputs["labels"])

    trainer = trainer_for(tmp_path, cls=OwnLossTrainer)
    enable_for_trainer(trainer)                          # nothing to refuse by name
    with pytest.raises(CALConfigError) as stopped:
        trainer.train()
    owner = ("OwnLossTrainer (compute_loss: test_a_compute_loss_that_discards_the_model_loss_stops_"
             "at_the_first_step.<locals>.OwnLossTrainer.compute_loss)")
    assert str(stopped.value) == DISCARDED.format(owner=owner)
    assert trainer.state.global_step == 1


def test_a_compute_loss_that_pops_the_labels_stops_at_the_first_step(tmp_path):
    from transformers import Trainer

    class PoppingTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            return _own_cross_entropy(model(**inputs), labels)

    trainer = trainer_for(tmp_path, cls=PoppingTrainer)
    enable_for_trainer(trainer)
    with pytest.raises(CALConfigError) as stopped:
        trainer.train()
    owner = ("PoppingTrainer (compute_loss: test_a_compute_loss_that_pops_the_labels_stops_at_the_"
             "first_step.<locals>.PoppingTrainer.compute_loss)")
    assert str(stopped.value) == NO_STEP.format(owner=owner, options="")


def test_a_compute_loss_built_on_the_model_loss_passes_the_check(tmp_path):
    """The control: a subclass that scales and adds to the model's loss (the CAL loss reaches the
    backward) trains past the first step, and its first update is the CAL loss's."""
    from transformers import Trainer

    class ScaledTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            loss = outputs.loss * 2.0 + 0.0 * outputs.logits.sum()
            return (loss, outputs) if return_outputs else loss

    trainer = trainer_for(tmp_path, cls=ScaledTrainer, max_steps=2)
    enable_for_trainer(trainer, log=True)
    trainer.train()
    assert trainer.state.global_step == 2
    assert "cal/mean_weight" in trainer.state.log_history[0]


def test_a_forward_replaced_after_enable_stops_at_the_first_step(tmp_path):
    """What Liger's fused cross-entropy does to an instance that calplug enabled (``model.forward =
    MethodType(lce_forward, model)``), imitated with the class's own forward: CAL never runs."""
    trainer = trainer_for(tmp_path)
    enable_for_trainer(trainer)
    trainer.model.forward = types.MethodType(type(trainer.model).forward, trainer.model)
    with pytest.raises(CALConfigError, match=re.escape(
            "CAL was bypassed: the first training step ran no CAL step on LlavaForConditionalGeneration, "
            "so the loss it optimised is not CAL's. Cause: the model's forward was replaced after "
            "calplug.enable (now LlavaForConditionalGeneration.forward): a kernel library (Liger's "
            "fused cross-entropy, Unsloth) or the trainer patched it. Apply such patches first, then "
            "enable CAL, or switch them off")):
        trainer.train()


# -- Liger: the config the Trainer applies (its Triton kernels do not run on a CPU) ---------------
@pytest.mark.parametrize("kernel_config, refused_kernel", [
    (None, "fused_linear_cross_entropy"),                                  # Liger's default
    ({"rms_norm": True, "swiglu": True}, "fused_linear_cross_entropy"),   # default left on
    ({"fused_linear_cross_entropy": False, "cross_entropy": True}, "cross_entropy"),
    ({"fused_linear_cross_entropy": False}, None),                        # layer kernels only
    ({"fused_linear_cross_entropy": False, "cross_entropy": False, "rope": True,
      "rms_norm": True, "swiglu": True}, None),
])
def test_liger_kernel_configs_compose_or_are_refused(tmp_path, kernel_config, refused_kernel):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_liger_kernel=True,
                             liger_kernel_config=kernel_config, use_cpu=True, report_to="none")
    trainer = types.SimpleNamespace(args=args)      # the Trainer would apply Liger (Triton) here
    if refused_kernel is None:
        refuse_bypasses(trainer)
        return
    with pytest.raises(CALConfigError) as refused:
        refuse_bypasses(trainer)
    if refused_kernel == "fused_linear_cross_entropy":
        assert str(refused.value) == LIGER_FLCE
    else:
        assert str(refused.value).startswith(
            "Liger Kernel: CAL cannot run with use_liger_kernel=True: Liger's cross_entropy kernel "
            "is on, and it replaces torch.nn.functional.cross_entropy for the whole process, and its "
            "reduction='none' path, which a weighted loss needs, gives wrong gradients (Liger-Kernel #968).")


# -- TRL --------------------------------------------------------------------------------------------
needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                               reason="needs trl (pip install trl): tox -e distributed")


@needs_trl
def test_trl_loss_type_dft_is_refused(tmp_path):
    """A real SFTTrainer with ``loss_type="dft"``: `enable_for_trainer` refuses it (TRL would
    compute DFT from the logits; with CAL's loss optimised instead the option would be ignored),
    before enabling anything; with ``"nll"`` it proceeds."""
    from trl import SFTConfig, SFTTrainer

    def build(loss_type):
        model = make_model()
        args = SFTConfig(output_dir=str(tmp_path / loss_type), per_device_train_batch_size=2,
                         max_steps=1, report_to="none", use_cpu=True, bf16=False, max_length=None,
                         loss_type=loss_type, remove_unused_columns=False,
                         dataset_kwargs={"skip_prepare_dataset": True},
                         **{_checkpointing_field(SFTConfig): False})
        return SFTTrainer(model=model, args=args, train_dataset=_hf.hf_dataset(_hf.samples(model)),
                          processing_class=_hf.tiny_tokenizer(), data_collator=_hf.RecordingCollator())

    trainer = build("dft")
    with pytest.raises(CALConfigError) as refused:
        enable_for_trainer(trainer)
    assert str(refused.value) == (
        "TRL: CAL cannot run with loss_type='dft': the SFTTrainer computes that loss from the logits "
        "in place of the model's, and calplug makes the trainer optimise the CAL loss, so the option "
        "would be silently ignored. Set loss_type='nll', or turn CAL off")
    assert not calplug.is_enabled(trainer.model)
    trainer = build("nll")
    enable_for_trainer(trainer)
    assert calplug.is_enabled(trainer.model)


def _checkpointing_field(config_cls):
    fields = config_cls.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"

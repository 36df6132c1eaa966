"""Single-process training features: HF gradient checkpointing, bf16 (weights and autocast),
and LoRA through PEFT."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch

import calplug
from calplug import contrast_pass, enabling, step
from calplug.integrations import compat
from calplug.testing import llava_batch

from _common import make_model
from _skips import module_found, needs


def _batch(model):
    return llava_batch(model, seed=3, lengths=(12, 9, 10), with_image=(True, True, False))


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# -- gradient checkpointing -----------------------------------------------------------------------
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_gradient_checkpointing_same_loss_and_grads_and_no_checkpointed_contrast_pass():
    plain, ckpt = make_model(), make_model()
    # transformers 5.2x renamed it activation_checkpointing_enable (the old name still works, deprecated)
    (getattr(ckpt, "activation_checkpointing_enable", None) or ckpt.gradient_checkpointing_enable)()
    decoder, _ = compat.vlm_decoder_and_head(ckpt)
    # Where the flag and the checkpoint function live depends on the version: on every decoder
    # layer (transformers 5.x), or on the decoder itself (4.x, which then checkpoints whenever
    # the flag is set and it is training, with or without grad).
    flagged = [m for m in decoder.modules() if getattr(m, "gradient_checkpointing", False) is True]
    assert flagged
    # Count checkpointed calls per decoder call (0 = main pass, 1 = contrast pass).
    decoder_call = [-1]
    decoder.register_forward_pre_hook(lambda m, a: decoder_call.__setitem__(0, decoder_call[0] + 1))
    per_call = {}
    for module in flagged:
        inner = module._gradient_checkpointing_func

        def counting(*args, _inner=inner, **kwargs):
            per_call[decoder_call[0]] = per_call.get(decoder_call[0], 0) + 1
            return _inner(*args, **kwargs)

        module._gradient_checkpointing_func = counting
    # use_cache=False as trainers pass it: the main pass would otherwise warn (rightly) that a
    # cache is incompatible with checkpointing; everything left to warn would be CAL's.
    batch = dict(_batch(plain), use_cache=False)
    calplug.enable(plain)
    calplug.enable(ckpt)
    logging.Logger.warning_once.cache_clear()  # transformers warns once per process
    out_plain = plain(**batch)
    out_plain.loss.backward()
    records = _Records()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out_ckpt = ckpt(**batch)
            out_ckpt.loss.backward()
    finally:
        hf_logger.removeHandler(records)
    assert decoder_call[0] == 1                         # a main and a contrast pass ran
    assert per_call == {0: len(decoder.layers)}         # only the main pass was checkpointed
    noisy = [str(w.message) for w in caught] + records.messages
    assert not [m for m in noisy if "checkpoint" in m.lower() or "requires_grad" in m], noisy
    assert float(out_ckpt.loss.detach()) == pytest.approx(float(out_plain.loss.detach()), abs=1e-5)
    torch.testing.assert_close(out_ckpt.cal_gaps, out_plain.cal_gaps, atol=1e-5, rtol=0)
    g_plain, g_ckpt = _grads(plain), _grads(ckpt)
    assert set(g_plain) == set(g_ckpt)
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], atol=1e-5, rtol=1e-4, msg=n)


def test_no_gradient_checkpointing_switches_flags_off_and_back_for_any_codebase():
    """The helper is generic: any submodule with ``gradient_checkpointing = True`` (the flag the
    older transformers decoders and the LLaVA-style codebases check, some without looking at
    grad mode) is off inside the block and on again afterwards, even after an error."""
    root = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2)))
    root.gradient_checkpointing = True
    root[1].gradient_checkpointing = True
    root[0].gradient_checkpointing = False
    with pytest.raises(RuntimeError):
        with contrast_pass._no_gradient_checkpointing(root):
            assert (root.gradient_checkpointing, root[1].gradient_checkpointing) == (False, False)
            raise RuntimeError("boom")
    assert (root.gradient_checkpointing, root[1].gradient_checkpointing) == (True, True)
    assert root[0].gradient_checkpointing is False


# -- bf16 -----------------------------------------------------------------------------------------
def _is_float32_not_bf16_grid(t):
    return t.dtype == torch.float32 and bool((t.bfloat16().float() != t).any())


@pytest.mark.parametrize("mode", ["bf16-weights", "bf16-autocast"])
def test_bf16_gaps_and_weights_in_fp32_and_loss_within_bf16_tolerance(mode):
    ref = make_model()
    batch = _batch(ref)
    with calplug.enabled(ref):
        want = ref(**batch)
    model = make_model()
    if mode == "bf16-weights":
        model = model.to(torch.bfloat16)
        batch = dict(batch, pixel_values=batch["pixel_values"].bfloat16())
        ctx = torch.autocast("cpu", enabled=False)
    else:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    with calplug.enabled(model), ctx:
        got = model(**batch)
        got.loss.backward()
    assert got.loss.dtype == torch.float32
    # Gaps and weights are float32 values, not bf16 values stored in float32.
    assert _is_float32_not_bf16_grid(got.cal_gaps)
    assert got.cal_weights.dtype == torch.float32
    sup = batch["labels"][:, 1:] != -100
    # bf16 keeps 8 bits of mantissa: relative error ~2^-8 per op; a 2-layer model stays within 2 %.
    assert float(got.loss.detach()) == pytest.approx(float(want.loss.detach()), rel=2e-2)
    assert float(got.cal_weights[sup].mean()) == pytest.approx(float(want.cal_weights[sup].mean()),
                                                               rel=5e-2)
    assert any(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# -- LoRA (PEFT) ----------------------------------------------------------------------------------
needs_peft = needs("peft", module_found("peft"), "peft is not installed (pip install peft): tox -e distributed")


@needs_peft
def test_lora_enable_finds_base_model_trains_adapters_only_and_merge_leaves_no_trace():
    from peft import LoraConfig, get_peft_model

    base = make_model()
    batch = _batch(base)
    with calplug.enabled(make_model()) as ref:
        want = ref(**batch)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8,
                                                 target_modules=["q_proj", "v_proj"]))
    calplug.enable(peft_model)
    assert enabling.unwrap_model(peft_model) is base
    assert calplug.is_enabled(peft_model) and step.STATE_ATTR in base.__dict__
    out = peft_model(**batch)
    # LoRA's B starts at 0: the adapted model is the base model, so the CAL loss is the same.
    assert hasattr(out, "cal_weights")
    assert float(out.loss.detach()) == pytest.approx(float(want.loss.detach()), abs=1e-5)
    out.loss.backward()
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad), sorted(with_grad)[:5]
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    # All but the adapters on the last CLIP layer, which vision_feature_layer=-2 never uses.
    assert trainable - with_grad == {n for n in trainable if "vision_tower.encoder.layers.1." in n}
    assert any(float(p.grad.abs().max()) > 0 for n, p in peft_model.named_parameters()
               if "lora_B" in n)
    torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0).step()
    calplug.disable(peft_model)
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(**batch).logits
    merged = peft_model.merge_and_unload()
    assert merged is base
    traces = [name for name, m in merged.named_modules()
              if step.STATE_ATTR in m.__dict__ or "forward" in m.__dict__]
    assert traces == [] and not calplug.is_enabled(merged)
    with torch.no_grad():
        merged_logits = merged(**batch).logits
    torch.testing.assert_close(merged_logits, adapted, atol=1e-3, rtol=1e-4)
    with torch.no_grad():
        base_logits = ref.eval()(**batch).logits
    assert float((adapted - base_logits).abs().max()) > 1e-3  # the training step mattered

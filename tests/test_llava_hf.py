"""calplug on transformers' LlavaForConditionalGeneration (tiny, seeded, CPU): the API around the
step (output type, enabling twice, one instance, the context manager), bad input, plugins.
The properties every integration shares are in tests/test_properties.py."""
import copy

import pytest
import torch

import calplug
from calplug import CALInputError, UnsupportedModelError, hookimpl, plugins
from calplug.hookspecs import Contrast
from calplug.testing import llava_batch, tiny_llava


@pytest.fixture
def model():
    """A fresh tiny Llava per test (overrides conftest's per-module one: these tests enable,
    disable and copy it)."""
    m = tiny_llava(seed=0)
    m.train()
    return m


def test_output_type_and_fields(model):
    batch = llava_batch(model)
    expected_type = type(model(**batch))
    calplug.enable(model)
    out = model(**batch)
    assert type(out) is expected_type
    assert out[0] is out.loss and out["loss"] is out.loss
    B, L = batch["input_ids"].shape
    assert out.cal_weights.shape == out.cal_gaps.shape == (B, L - 1)
    assert out.logits.shape[:2] == (B, L)


def test_existing_instance_forward_is_restored_exactly(model):
    original = model.forward
    def wrapped(*args, **kwargs):
        return original(*args, **kwargs)
    model.forward = wrapped
    calplug.enable(model)
    calplug.disable(model)
    assert model.__dict__["forward"] is wrapped


def test_enable_twice_updates_config_and_patches_once(model):
    calplug.enable(model, beta=4.0)
    patched = model.__dict__["forward"]
    calplug.enable(model, beta=3.0)
    assert model.__dict__["forward"] is patched
    assert calplug.config_of(model).beta == 3.0
    calplug.disable(model)
    assert "forward" not in model.__dict__


def test_only_this_instance_is_patched(model):
    other = tiny_llava(seed=1).train()
    batch = llava_batch(model)
    calplug.enable(model)
    assert not calplug.is_enabled(other)
    assert not hasattr(other(**batch), "cal_weights")
    assert hasattr(model(**batch), "cal_weights")


def test_context_manager(model):
    with calplug.enabled(model, alpha=0.0) as m:
        assert m is model and calplug.config_of(model).alpha == 0.0
    assert not calplug.is_enabled(model)
    calplug.enable(model, beta=2.0)
    with calplug.enabled(model, beta=4.0):
        assert calplug.config_of(model).beta == 4.0
    assert calplug.config_of(model).beta == 2.0 and calplug.is_enabled(model)


def test_return_dict_false_puts_loss_first(model):
    batch = llava_batch(model)
    calplug.enable(model)
    out = model(**batch, return_dict=False)
    assert isinstance(out, tuple) and out[0].dim() == 0 and out[1].dim() == 3


# -- bad input ------------------------------------------------------------------------------------
def test_unknown_model_lists_supported_classes():
    with pytest.raises(UnsupportedModelError, match=r"Linear.*Supported model classes: .*LlavaForConditionalGeneration"):
        calplug.enable(torch.nn.Linear(2, 2))


def test_labels_shape_mismatch(model):
    batch = llava_batch(model)
    batch["labels"] = batch["labels"][:, :-2]
    calplug.enable(model)
    with pytest.raises(CALInputError, match=r"labels of shape \(3, 26\) do not match input_ids of shape \(3, 28\)"):
        model(**batch)


def test_image_placeholders_without_pixels(model):
    batch = llava_batch(model)
    batch["pixel_values"] = None
    calplug.enable(model)
    with pytest.raises(CALInputError, match="image placeholder tokens but no pixel_values"):
        model(**batch)


def test_bad_config_at_enable(model):
    with pytest.raises(calplug.CALConfigError, match="pool_window"):
        calplug.enable(model, pool_window=2)
    assert not calplug.is_enabled(model)


# -- plugins --------------------------------------------------------------------------------------
class DoubleSupervisedWeights:
    @hookimpl
    def calplug_weights(self, gaps, supervised):
        return supervised.float() * 2.0 + 1.0


class Recorder:
    def __init__(self):
        self.steps = []

    @hookimpl
    def calplug_observe_step(self, gaps, weights, labels, supervised, config):
        self.steps.append((gaps, weights, labels, supervised, config))


def test_custom_weighting_plugin_changes_the_loss_and_observer_sees_it(model):
    batch = llava_batch(model)
    calplug.enable(model, contrast="mask")
    base = model(**batch).loss
    plugin, recorder = DoubleSupervisedWeights(), Recorder()
    plugins.register(plugin, name="test-weights")
    plugins.register(recorder, name="test-recorder")
    try:
        out = model(**batch)
    finally:
        plugins.unregister(name="test-weights")
        plugins.unregister(name="test-recorder")
    assert torch.all(out.cal_weights[out.cal_weights != 1.0] == 3.0)
    # weights are constant on supervised rows, so the loss is still the plain mean... use it:
    torch.testing.assert_close(out.loss, base, rtol=1e-6, atol=0)
    delta, weights, labels, supervised, config = recorder.steps[0]
    assert weights.shape == delta.shape == labels.shape == supervised.shape
    assert config.contrast == "mask"
    assert torch.equal(model(**batch).loss, base)  # unregistered: back to the built-in


class UpweightFirstAnswerToken:
    @hookimpl
    def calplug_weights(self, supervised):
        w = supervised.float()
        first = supervised.float().cumsum(1) == 1
        return torch.where(first & supervised, torch.full_like(w, 10.0), w)


def test_non_uniform_plugin_weights_change_the_loss(model):
    batch = llava_batch(model)
    calplug.enable(model)
    base = model(**batch).loss
    plugins.register(UpweightFirstAnswerToken(), name="test-first")
    try:
        out = model(**batch)
    finally:
        plugins.unregister(name="test-first")
    assert abs(out.loss.item() - base.item()) > 1e-4


def test_custom_contrast_plugin_is_selectable(model):
    calls = []

    class NoContrast:
        @hookimpl
        def calplug_contrasts(self):
            def nothing(main, config):
                calls.append(main.visual_mask.sum().item())
                return None
            return [Contrast("nothing", nothing)]

    plugins.register(NoContrast(), name="test-contrast")
    try:
        calplug.enable(model, contrast="nothing")
        out = model(**llava_batch(model))
    finally:
        calplug.disable(model)
        plugins.unregister(name="test-contrast")
    assert calls == [32] and torch.all(out.cal_gaps == 0)
    with pytest.raises(calplug.CALConfigError, match="'nothing' is not a registered contrast"):
        calplug.enable(model, contrast="nothing")  # unregistered again: refused at enable
    assert not calplug.is_enabled(model)


def test_misspelt_hook_fails_loudly():
    class Typo:
        @hookimpl
        def calplug_weight(self, gaps):
            return gaps

    with pytest.raises(Exception, match="calplug_weight"):
        plugins.register(Typo(), name="test-typo")
    plugins.unregister(name="test-typo")


def test_deepcopy_of_an_enabled_model_patches_the_copy(model):
    calplug.enable(model, alpha=0.0)
    clone = copy.deepcopy(model)
    assert calplug.is_enabled(clone)
    batch = llava_batch(model)
    out = clone(**batch)
    out.loss.backward()
    assert any(p.grad is not None for p in clone.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_logging_stats_report_the_share_of_rows_that_got_a_contrast(model):
    """`cal/share_contrasted`: supervised rows of samples with an image have a contrast value,
    rows of the text-only sample none (gap 0 by definition), in both contrasts."""
    from calplug.trainer import CALStats

    batch = llava_batch(model)  # samples 0 and 1 have an image, sample 2 is text-only
    supervised = batch["labels"][:, 1:] != -100
    expected = float(supervised[:2].sum()) / float(supervised.sum())
    assert 0.0 < expected < 1.0
    for contrast in ("drop", "mask"):
        stats = CALStats().register()
        try:
            with calplug.enabled(model, contrast=contrast):
                model(**batch)
        finally:
            stats.unregister()
        assert stats.scalars()["cal/share_contrasted"] == pytest.approx(expected)


def test_an_image_whose_positions_are_all_padding_reaches_no_token(model):
    """LLaMA-Factory's text-only batches carry a placeholder image appended after the text with
    attention mask 0 (so every rank runs the vision tower under ZeRO-3). Such an image reaches no
    token: its sample is text-only for CAL (no contrast, gap exactly 0, weight alpha), and the
    other samples' gaps, weights and loss are those of the batch without it."""
    from calplug.trainer import CALStats

    text_only = llava_batch(model, lengths=(9, 10), with_image=(False, False))
    n = model.config.image_seq_length
    B, L = text_only["input_ids"].shape
    # the placeholder image after sample 0's text, masked out, as LLaMA-Factory's collator does
    end = int(text_only["attention_mask"][0].sum())
    ids = torch.zeros(B, L + n, dtype=torch.long)
    mask = torch.zeros(B, L + n, dtype=torch.long)
    labels = torch.full((B, L + n), -100, dtype=torch.long)
    ids[:, :L], mask[:, :L], labels[:, :L] = text_only["input_ids"], text_only["attention_mask"], text_only["labels"]
    ids[0, end:end + n] = model.config.image_token_index
    padded = dict(input_ids=ids, attention_mask=mask, labels=labels,
                  pixel_values=torch.zeros(1, 3, 32, 32))
    stats = CALStats().register()
    try:
        with calplug.enabled(model, alpha=0.5):
            faked = model(**padded)
            plain = model(**text_only)
    finally:
        stats.unregister()
    sup = labels[:, 1:] != -100
    assert float(faked.cal_gaps[sup].abs().max()) == 0.0           # no contrast: exactly 0
    assert bool((faked.cal_weights[sup] == 0.5).all())              # weight alpha
    assert float(plain.cal_gaps.abs().max()) == 0.0
    torch.testing.assert_close(faked.loss, plain.loss, rtol=1e-6, atol=1e-6)
    assert stats.contrasted == 0                                    # cal/share_contrasted: 0

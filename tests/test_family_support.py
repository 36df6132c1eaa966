"""Which transformers classes calplug supports, refuses (and why) or only matches, and the support
matrix built from it: every class the installed transformers maps to image-text-to-text gets its
status, recorded in this env's junit results (testsuite property ``calplug_support``) for
tests/support_matrix.py, which the tox env ``support-matrix`` runs with the standard library
only (its rule is tested in tests/test_support_matrix.py); refused classes raise their reason at
enable; a matched class runs with a warning.

Run by every env of the transformers matrix (tox.ini: py, hf-4.45, hf-4.49, hf-4.57).
"""
from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

import calplug
from calplug import UnsupportedModelError, enabling, plugins
from calplug.integrations import families
import _hf_families as hf
import _hf_kinds as kinds
from _hf_families import FAMILIES, build_deepseek_vl, build_fuyu, tf_version


STATUSES = ("proven", "refused", "matched")


def class_status(name: str) -> tuple[str, str]:
    """(status, reason) of a class: the answer of the registered integration that speaks for it
    (`Integration.support_status`, asked with the class: the cross-attention, encoder-decoder and
    Kosmos integrations), else the family table's (`families.support_status`)."""
    import transformers

    cls = getattr(transformers, name, None)
    if cls is not None:
        for integration in plugins.integrations():
            answer = integration.support_status(cls) if integration.support_status is not None else None
            if answer is not None:
                return answer
    return families.support_status(name)


def kind_keys() -> dict:
    """The family keys of tests/_hf_kinds.py for the support matrix, {key: [family, class]}; a
    class that is the kind only with some language model (BLIP-2 with T5) is named with it."""
    return {k.name: [k.display, k.class_name + (" (T5)" if k.name.endswith("_t5") else "")]
            for k in kinds.KINDS.values()}


def mapping_classes() -> tuple[str, list[str]]:
    """(name of the mapping, its class names): the image-text-to-text mapping, or on releases
    before it existed (4.45) the vision-to-sequence mapping that preceded it."""
    from transformers.models.auto import modeling_auto

    for name in ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES"):
        mapping = getattr(modeling_auto, name, None)
        if mapping is not None:
            names = set()
            for value in mapping.values():
                names.update((value,) if isinstance(value, str) else value)
            return name, sorted(names)
    pytest.skip("this transformers has neither an image-text-to-text nor a vision-to-sequence mapping")


def test_every_image_text_to_text_class_has_a_status(record_testsuite_property):
    """Each class of the mapping, and each class of calplug's family table this release has, gets
    proven / refused / matched with a reason; a proven one has family cases in the tests, a
    refused one is in the refusal table or fails the generic rule. Recorded for the matrix."""
    import transformers

    mapping, classes = mapping_classes()
    table = [f.class_name for f in families.FAMILIES.values() if hasattr(transformers, f.class_name)]
    statuses = {}
    for name in sorted(set(classes) | set(table)):
        status, reason = class_status(name)
        assert status in STATUSES and reason, name
        statuses[name] = [status, reason, name in classes]
    kind_classes = {k.class_name for k in kinds.KINDS.values()}
    for name, (status, reason, _) in statuses.items():
        if status == "proven" and name not in kind_classes:
            facts = families.FAMILIES[name]
            assert facts.key in hf.FAMILIES and hf.FAMILIES[facts.key].class_name == name
        if name in families.REFUSED:
            assert status == "refused" and reason == families.REFUSED[name]
    assert statuses["LlavaForConditionalGeneration"][0] == "proven"
    if tf_version() >= (5, 0):  # the placeholder-token families of the table are proven
        assert sum(s == "proven" for s, _, _ in statuses.values()) >= 20, statuses
    keys = {f.key: [f.family, f.class_name] for f in families.FAMILIES.values()}
    keys.update(kind_keys())
    record_testsuite_property("transformers", transformers.__version__)
    record_testsuite_property("calplug_support", json.dumps(
        {"mapping": mapping, "classes": statuses, "families": keys}, sort_keys=True))


# -- refusals, matched classes, broken releases -------------------------------------------------
def build_mistral4(seed=0):
    """Mistral4ForCausalLM, a text-only causal LM (refused by nature), from its shrunk default."""
    import transformers
    from _hf_shrunk import TEXT_SIZES, _shrink

    cls = transformers.Mistral4ForCausalLM
    config = cls.config_class()
    _shrink(config, TEXT_SIZES)
    return hf._eager(config, seed, cls)


REFUSED_BUILDERS = {"Mistral4ForCausalLM": (build_mistral4, (5, 0))}


@pytest.mark.parametrize("class_name", list(REFUSED_BUILDERS))
def test_refused_classes_name_why_at_enable(class_name):
    build, since = REFUSED_BUILDERS[class_name]
    if tf_version() < since:
        pytest.skip(f"{class_name} needs transformers >= {since[0]}.{since[1]}")
    try:
        model = build(0)
    except (TypeError, ValueError) as error:  # an older release's config takes other arguments
        pytest.skip(f"the tiny {class_name} config does not build on this release: {error}")
    reason = families.REFUSED[class_name]
    with pytest.raises(UnsupportedModelError, match="calplug does not support") as raised:
        calplug.enable(model)
    assert reason in str(raised.value)
    assert not calplug.is_enabled(model)
    assert families.support_status(class_name) == ("refused", reason)


def test_fuyu_is_refused_before_it_splices_at_placeholder_ids():
    """Fuyu before 4.53 scatters its patch embeddings by index lists: enable refuses those
    releases naming it and the first release that splices at config.image_token_id; from 4.53
    its family cases run (hf-fuyu-*)."""
    model = build_fuyu(0)
    if tf_version() < (4, 53):
        with pytest.raises(UnsupportedModelError, match="image_patches_indices") as raised:
            calplug.enable(model)
        assert "transformers >= 4.53" in str(raised.value) and not calplug.is_enabled(model)
    else:
        calplug.enable(model)
        assert calplug.is_enabled(model)
    assert families.support_status("FuyuForCausalLM")[0] == "proven"


def test_nemotron_h_omni_video_pruning_is_refused_at_the_step_naming_the_setting():
    """Nemotron-H Omni's video token pruning (video_pruning_rate > 0) removes video rows inside the
    forward: enable accepts the model, image batches train, and a batch with videos is refused at
    the step naming the setting (the model's own loss fails on it too); with the rate back at 0
    the same video batch trains."""
    from _hf_shrunk import build_nemotron_h_omni

    family = FAMILIES["nemotron_h_omni"]
    reason = family.skip_reason()
    if reason is not None:
        pytest.skip(reason)
    model = build_nemotron_h_omni(0, pruning=0.5).train()
    images = hf.make_batch(family, model)
    # one prompt: its pruning handles videos of a single prompt only (a batch of three fails a view)
    videos = hf.make_batch(family, model, kinds=("video",), lengths=(10,))
    with pytest.raises(ValueError):  # upstream: pruned logits, unpruned labels
        model(**videos)
    calplug.enable(model)
    assert torch.isfinite(model(**images).loss)
    with pytest.raises(calplug.CALInputError, match="video_pruning_rate is 0.5") as raised:
        model(**videos)
    assert "model.video_pruning_rate = 0.0" in str(raised.value)
    model.video_pruning_rate = model.config.video_pruning_rate = 0.0
    assert torch.isfinite(model(**videos).loss)


def test_qformer_models_go_to_their_kind_or_are_refused_with_the_fix():
    """BLIP-2 with T5 is the encoder-decoder kind; BLIP-2 with OPT whose config sets no
    image_token_index (the query outputs are not at placeholder positions) is refused at enable
    with the reason and the fix; on a release whose OPT decoder takes no position_ids (4.45),
    the OPT variants are refused naming why (their cases run from 4.49)."""
    from _hf_qformer import build_blip_2

    t5 = kinds.build_blip_2_t5(0)
    assert enabling.find_integration(t5).name == "transformers-encoder-decoder"
    unset = build_blip_2(0, image_token=None)
    with pytest.raises(UnsupportedModelError, match="its config sets none of config.image_token_index") as raised:
        calplug.enable(unset)
    assert "the processor's image token" in str(raised.value) and not calplug.is_enabled(unset)
    opt = build_blip_2(0)
    if tf_version() < (4, 49):
        with pytest.raises(UnsupportedModelError, match="takes no position_ids"):
            calplug.enable(opt)
    else:
        calplug.enable(opt)
        assert calplug.is_enabled(opt)
        assert enabling.find_integration(opt).name != "transformers-encoder-decoder"


def test_minicpm_v_without_its_image_token_ids_is_refused_naming_the_processor_ids():
    """MiniCPM-V's class default leaves image_token_id unset, and its forward then ignores the
    pixels: enable refuses such a model, naming the ids its processor marks images with; with them
    set (as a released checkpoint has them) it is accepted."""
    from _hf_shrunk import shrunk

    name = "MiniCPMV4_6ForConditionalGeneration"
    if not hasattr(__import__("transformers"), name):
        pytest.skip(f"{name} needs transformers >= 5.0; run `tox -e py`")
    unset = shrunk(name, 0, top=dict(image_token_id=None, video_token_id=None))
    with pytest.raises(UnsupportedModelError, match="its config sets none of config.image_token_id") as raised:
        calplug.enable(unset)
    assert "processor.image_token_id" in str(raised.value) and not calplug.is_enabled(unset)
    model = shrunk(name, 0)
    calplug.enable(model)
    assert calplug.is_enabled(model)


@pytest.mark.parametrize("class_name", sorted(families.REFUSED))
def test_refusal_table_names_the_reason(class_name):
    """Every class of the placeholder integration's refusal table is refused with its own reason."""
    assert families.support_status(class_name) == ("refused", families.REFUSED[class_name])


def test_matched_class_is_accepted_once_warned_and_runs():
    """Unlimited-OCR has no row and no family case: the generic rule accepts it, calplug enables
    it with one warning per class naming `calplug verify`, and the CAL step runs (its first-step
    self-check passes)."""
    from _hf_shrunk import MATCHED_CLASS, MATCHED_VISUAL, build_matched

    if tf_version() < (5, 0) or not hasattr(__import__("transformers"), MATCHED_CLASS):
        pytest.skip(f"{MATCHED_CLASS} needs transformers >= 5.0; run `tox -e py`")
    model = build_matched(0).train()
    calplug.errors._WARNED.discard(f"matched:{MATCHED_CLASS}")
    with pytest.warns(UserWarning, match="calplug verify"):
        calplug.enable(model)
    calplug.disable(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calplug.enable(model)  # once per class
    family = dataclasses.replace(FAMILIES["vipllava"], visual=MATCHED_VISUAL, images=False)
    out = model(**hf.make_batch(family, model))
    assert torch.isfinite(out.loss) and out.cal_gaps.abs().max() > 0
    status, reason = families.support_status(MATCHED_CLASS)
    assert status == "matched" and "calplug verify" in reason


@pytest.mark.parametrize("key", sorted(k for k, f in FAMILIES.items()
                                        if families.FAMILIES[f.class_name].broken and k != "llama4"))
def test_broken_releases_are_refused_with_the_upstream_bug(key):
    """A release whose forward of the class is broken upstream (its family row's ``broken``) is
    refused at enable with the named bug; the family's other releases are accepted."""
    import transformers

    family = FAMILIES[key]
    if not family.available():
        pytest.skip(f"{family.class_name} needs transformers >= {family.since[0]}.{family.since[1]}")
    model = family.build(0)
    reasons = dict(families.FAMILIES[family.class_name].broken)
    if transformers.__version__ in reasons:
        with pytest.raises(UnsupportedModelError) as raised:
            calplug.enable(model)
        assert reasons[transformers.__version__] in str(raised.value) and not calplug.is_enabled(model)
    else:
        calplug.enable(model)
        assert calplug.is_enabled(model)


def test_discrete_image_token_labels_are_refused_at_the_step():
    """Chameleon's image tokens are codes of its text vocabulary: a batch with labels on them
    trains image generation, which the step refuses, naming them; text labels train."""
    family = FAMILIES["chameleon"]
    reason = family.skip_reason()
    if reason is not None:
        pytest.skip(reason)
    model = family.build(0).train()
    batch = hf.make_batch(family, model)
    calplug.enable(model)
    assert torch.isfinite(model(**batch).loss)
    labels = batch["labels"].clone()
    labels[0, -3:] = 205  # image token ids (the VQ codes 200 .. 215 of the tiny vocabulary)
    with pytest.raises(calplug.CALInputError, match="3 labels are image tokens") as raised:
        model(**dict(batch, labels=labels))
    assert "trains image generation" in str(raised.value) and "-100" in str(raised.value)


def test_llama4_on_a_broken_release_is_refused_with_the_upstream_bug():
    if tf_version() < (4, 51):
        pytest.skip("Llama4ForConditionalGeneration needs transformers >= 4.51")
    import transformers

    model = FAMILIES["llama4"].build(0)
    if transformers.__version__ == "5.24.0":
        with pytest.raises(UnsupportedModelError, match="image_outputs"):
            calplug.enable(model)
    else:
        calplug.enable(model)
        assert calplug.is_enabled(model)


# -- the table, the tests and support_status agree ----------------------------------------------
def test_every_proven_family_has_cases_and_every_family_case_a_row():
    from cases import CASES

    keys = {c.id.split("-")[1] for c in CASES if c.id.startswith("hf-")}
    assert keys - set(FAMILIES) == set(kinds.KINDS)  # the kinds' cases: their integrations speak for them
    keys &= set(FAMILIES)
    rows = {f.key: f for f in families.FAMILIES.values()}
    proven = {k for k, f in rows.items() if f.proven}
    assert proven <= keys, proven - keys
    for key in keys:
        assert FAMILIES[key].class_name == rows[key].class_name
        if key not in proven:  # cases that cannot run in the tox matrix (timm): matched, not proven
            assert FAMILIES[key].unavailable is not None and rows[key].unproven_reason
    for facts in families.FAMILIES.values():
        status, reason = families.support_status(facts.class_name)
        assert status == ("proven" if facts.proven else "matched"), facts.class_name
        assert reason
    assert not families.FAMILIES.keys() & families.REFUSED.keys()

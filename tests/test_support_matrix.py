"""tests/support_matrix.py, the generator of docs/support-matrix.md, on junit files written here:
"proven" only where a family's whole property set passed on a release (each rule shown keeping
a family from proven), results of other source or of another env left out, and the rule tied to
the tests it names (the property tests exist, every family case's id carries the settings the
rule asks for, the not-applicable skip is the one tests/test_properties.py makes)."""
from __future__ import annotations

import json
import re
from xml.sax.saxutils import quoteattr

import pytest

import _results
import support_matrix as sm

PROPS, CALLS, VERIFY = "tests.test_properties", "tests.test_family_calls", "tests.test_verify"
FAMILIES = {"llava": ["Llava", "LlavaForConditionalGeneration"],
            "qwen3_vl": ["Qwen3-VL", "Qwen3VLForConditionalGeneration"],
            "qwen2_vl": ["Qwen2-VL", "Qwen2VLForConditionalGeneration"],
            "llama4": ["Llama4", "Llama4ForConditionalGeneration"],
            "gemma3": ["Gemma3", "Gemma3ForConditionalGeneration"],
            "paligemma": ["PaliGemma", "PaliGemmaForConditionalGeneration"],
            "lfm2_vl": ["LFM2-VL", "Lfm2VlForConditionalGeneration"],
            "molmo2": ["Molmo2", "Molmo2ForConditionalGeneration"],
            "aria": ["Aria", "AriaForConditionalGeneration"]}
PROVEN = ["proven", "family cases", True]
BOTH = "a0-b5-w3+a1-b5-w3"
NOT_APPLICABLE = ("this decoder's conv layers do not honour mask holes, so calplug refuses "
                  "contrast='mask' for it")


def outcome(result):
    if result == "passed":
        return ""
    if result == "failed":
        return '<failure message="assert 1 == 2"/>'
    return f"<skipped message={quoteattr(result)}/>"


def full_set(family, settings=BOTH, sides=("right", "left"), **override):
    """Testcases of the whole property set of ``family`` (image cases on both paddings) and its
    verify test, all passed; ``override``: {property test (or "verify"): result} replacing it."""
    cases = []
    for side in sides:
        case = f"hf-{family}-image-{side}"
        for test in sm.PROPERTIES:
            if test == "test_generate_is_unchanged" and side != "right":
                continue
            name = f"{test}[{case}-{settings}]" if test == sm.FAITHFUL else f"{test}[{case}]"
            cases.append((PROPS, name, override.get(test, "passed")))
    cases.append((VERIFY, f"test_verify_passes_on_every_family[{family}-image]",
                  override.get("verify", "passed")))
    return [c for c in cases if c[2] is not None]


def write(folder, env, version, classes, cases, source=None, recorded_env=None, families=None):
    support = json.dumps({"mapping": "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
                          "classes": classes, "families": FAMILIES if families is None else families})
    body = "".join(f'<testcase classname="{module}" name="{name}">{outcome(result)}</testcase>'
                   for module, name, result in cases)
    stamp = _results.source_hash() if source is None else source
    props = {"transformers": version, "calplug_support": support, "calplug_source": stamp,
             "calplug_env": env if recorded_env is None else recorded_env}
    (folder / f"{env}.xml").write_text(
        '<testsuites><testsuite time="2.5"><properties>'
        + "".join(f"<property name={quoteattr(k)} value={quoteattr(v)}/>" for k, v in props.items())
        + f"</properties>{body}</testsuite></testsuites>")


def generate(tmp_path, capsys=None) -> str:
    out = tmp_path / "matrix.md"
    assert sm.main([str(tmp_path), str(out)]) == 0
    return out.read_text()


def row(text, cls):
    return next(line for line in text.splitlines() if line.startswith(f"| `{cls}` |"))


def test_proven_only_where_the_whole_property_set_passed(tmp_path):
    classes = {cls: PROVEN for _, cls in FAMILIES.values()}
    classes["MllamaForConditionalGeneration"] = ["refused", "Mllama: cross-attention", True]
    classes["DeepseekVLForConditionalGeneration"] = ["matched", "run `calplug verify`", True]
    new = (
        full_set("llava")
        + full_set("qwen3_vl") + [(CALLS, "test_qwen3_vl_visual_extras_cleared_by_drop_kept_by_mask", "failed")]
        + [(PROPS, f"{t}[hf-qwen2_vl-image-right" + (f"-{BOTH}]" if t == sm.FAITHFUL else "]"), "needs timm")
           for t in sm.PROPERTIES]
        + [(CALLS, "test_llama4_on_a_broken_release_is_refused_with_the_upstream_bug", "passed")]
        # the old rule's "proven": one property test passed, none failed
        + [(PROPS, "test_generate_is_unchanged[hf-gemma3-image-right]", "passed")]
        + full_set("paligemma", settings="a0-b5-w3")                     # no alpha 1 with pooling
        + full_set("lfm2_vl", test_drop_equals_mask_on_text_rows=NOT_APPLICABLE)   # does not apply
        + full_set("molmo2", verify=None)                                 # verify did not run
        + full_set("aria", test_unit_weights_give_the_models_own_loss_and_text_only_samples_weigh_alpha="needs X")
        + [(CALLS, "test_partial_logits_refused[llava]", "takes no logits_to_keep")]
    )
    write(tmp_path, "py", "5.24.0", classes, new)
    write(tmp_path, "hf-4.45", "4.45.2", {"LlavaForConditionalGeneration": PROVEN,
                                          "MllamaForConditionalGeneration": ["refused", "Mllama: cross-attention", False]},
          full_set("llava") + [(CALLS, "test_faithful_mode_equals_reference[qwen3_vl-image]",
                                "Qwen3VLForConditionalGeneration needs transformers >= 4.57")])
    (tmp_path / "distributed.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.distributed.x" name="t"/></testsuite></testsuites>')
    text = generate(tmp_path)

    assert row(text, "LlavaForConditionalGeneration") == (
        "| `LlavaForConditionalGeneration` | proven (4.45.2, 5.24.0) | all | family `llava`: its whole "
        "property set passes on 4.45.2, 5.24.0 |")
    assert row(text, "Qwen3VLForConditionalGeneration") == (
        "| `Qwen3VLForConditionalGeneration` | FAIL | 5.24.0 | family `qwen3_vl`; FAIL on 5.24.0 "
        "(1 of 13 failed) |")
    assert "unproven: its cases did not run" in row(text, "Qwen2VLForConditionalGeneration")
    assert "its tests skip where [1]" in row(text, "Qwen2VLForConditionalGeneration")
    assert "not proven on 5.24.0 (its property cases did not run)" in row(text, "Llama4ForConditionalGeneration")
    gemma3 = row(text, "Gemma3ForConditionalGeneration")
    assert "unproven: its property set did not pass whole" in gemma3
    for what in ("faithful = reference (loss, gaps, weights, gradients): did not run",
                 "unit weights = the model's own loss: did not run", "drop = mask on text rows: did not run",
                 "disable restores: did not run", "eval untouched: did not run", "calplug verify: did not run"):
        assert what in gemma3, what
    assert "generate() untouched" not in gemma3
    paligemma = row(text, "PaliGemmaForConditionalGeneration")
    assert ("faithful at alpha 1 with pooling: not run on hf-paligemma-image-left, hf-paligemma-image-right"
            in paligemma) and "alpha 0" not in paligemma and "unproven" in paligemma
    assert "| proven (5.24.0) |" in row(text, "Lfm2VlForConditionalGeneration")
    assert "not proven on 5.24.0 (calplug verify: did not run)" in row(text, "Molmo2ForConditionalGeneration")
    assert ("unit weights = the model's own loss: skipped (needs X)"
            in row(text, "AriaForConditionalGeneration"))
    assert "| `MllamaForConditionalGeneration` | refused | all | Mllama: cross-attention |" in text
    assert "| `DeepseekVLForConditionalGeneration` | matched, unproven | 5.24.0 | run `calplug verify` |" in text
    assert ("transformers 5.24.0: 11 classes: 2 proven, 1 refused, 1 matched but unproven, 1 failing "
            "their family's tests, 6 whose family's property set did not pass whole; 2 families proven "
            "on 5.24.0.") in text
    # family x release test counts
    header = next(line for line in text.splitlines() if line.startswith("| family"))
    assert header.index("4.45.2") < header.index("5.24.0") and "distributed" not in header
    assert "| Qwen3-VL | `Qwen3VLForConditionalGeneration` | - | FAIL 1/13 |" in text
    assert "| Llava | `LlavaForConditionalGeneration` | pass 12/12 | pass 12/13, 1 skipped [2] |" in text
    assert "1. needs timm" in text and "2. takes no logits_to_keep" in text
    assert "| pytest seconds (whole env) | | 2.5 | 2.5 |" in text


def test_a_kind_is_proven_by_its_own_verify_test_and_drop_mask_not_applying(tmp_path):
    """The cross-attention / encoder-decoder kinds: drop = mask skips as not applicable (the image
    has no positions) and their verify test is tests/test_kinds.py's; a kind whose verify test
    skips (Kosmos-2.5's batch, which verify refuses) is not proven."""
    import test_properties

    kinds = {"mllama": ["Mllama", "MllamaForConditionalGeneration"],
             "kosmos2_5": ["Kosmos-2.5", "Kosmos2_5ForConditionalGeneration"]}
    no_positions = f"cross-attention models: {test_properties.NO_POSITIONS}"
    cases = []
    for family in kinds:
        cases += full_set(family, test_drop_equals_mask_on_text_rows=no_positions, verify=None)
    cases.append(("tests.test_kinds", "test_verify_passes_on_every_kind[mllama]", "passed"))
    cases.append(("tests.test_kinds", "test_verify_passes_on_every_kind[kosmos2_5]",
                  "verify replaces pixel_values* tensors with noise"))
    classes = {cls: PROVEN for _, cls in kinds.values()}
    write(tmp_path, "py", "5.24.0", classes, cases, families=kinds)
    text = generate(tmp_path)
    assert "| proven (5.24.0) |" in row(text, "MllamaForConditionalGeneration")
    kosmos = row(text, "Kosmos2_5ForConditionalGeneration")
    assert "unproven" in kosmos and "calplug verify: skipped" in kosmos, kosmos


def test_results_of_other_source_or_another_env_are_left_out(tmp_path, capsys):
    classes = {"LlavaForConditionalGeneration": PROVEN}
    write(tmp_path, "py", "5.24.0", classes, full_set("llava"))
    write(tmp_path, "hf-4.49", "4.49.0", classes, full_set("llava"), source="0123456789abcdef")  # stale
    write(tmp_path, "hf-4.57", "4.57.6", classes, full_set("llava"), recorded_env="py")  # renamed copy
    text = generate(tmp_path)
    printed = capsys.readouterr().out
    assert "| proven (5.24.0) | all |" in row(text, "LlavaForConditionalGeneration")
    assert "4.49.0" not in text and "4.57.6" not in text
    assert f"left out hf-4.49.xml: recorded from other source (0123456789abcdef; this checkout is " \
           f"{_results.source_hash()}): re-run that env" in printed
    assert "left out hf-4.57.xml: recorded by env 'py', not 'hf-4.57'" in printed
    assert "wrote" in printed and "from py.xml" in printed
    (tmp_path / "py.xml").unlink()
    assert sm.main([str(tmp_path), str(tmp_path / "matrix.md")]) == 1  # nothing current is left


def test_the_source_hash_follows_what_decides_the_tests_and_not_the_readers(tmp_path):
    for name, text in {"calplug/a.py": "x = 1\n", "tests/test_a.py": "", "tests/support_matrix.py": "r",
                       "docs/x.md": "d", "tox.ini": "[tox]\n"}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    first = _results.source_hash(tmp_path)
    (tmp_path / "docs/x.md").write_text("regenerated")           # the docs it writes
    (tmp_path / "tests/support_matrix.py").write_text("fixed")   # a reader
    assert _results.source_hash(tmp_path) == first
    (tmp_path / "calplug/a.py").write_text("x = 2\n")
    assert _results.source_hash(tmp_path) != first


# -- the rule names real tests -----------------------------------------------------------------
def test_the_rule_names_the_property_tests_and_their_not_applicable_skip():
    import importlib

    import test_properties

    for test in sm.PROPERTIES:
        assert callable(getattr(test_properties, test, None)), test
    for module, test in sm.VERIFY:
        assert callable(getattr(importlib.import_module(module.split(".")[-1]), test, None)), test
        assert module in sm.MODULES
    markers = sm.NOT_APPLICABLE["test_drop_equals_mask_on_text_rows"]
    assert set(sm.NOT_APPLICABLE) == {"test_drop_equals_mask_on_text_rows"}
    assert markers[0] in test_properties.MASK_REFUSED and markers[1] in test_properties.NO_POSITIONS
    assert sm.CASES_MODULE in sm.MODULES


def test_every_family_case_id_carries_the_settings_the_rule_asks_for():
    """Each family case's faithful test id (cases.params) parses to settings that satisfy every
    entry of SETTINGS: a case added without alpha 1 with pooling would never prove its family."""
    from cases import CASES, params

    family_params = [p for p in params(with_settings=True) if p.id.startswith("hf-")]
    assert len(family_params) == sum(c.id.startswith("hf-") for c in CASES) > 20
    for p in family_params:
        match = sm.CASE_ID.search(f"[{p.id}]")
        assert match and match.group(1) == p.values[0].id, p.id
        settings = [(float(a), float(b), int(w)) for a, b, w in sm.SETTING_ID.findall(match.group(3))]
        assert settings == [tuple(s) for s in p.values[0].settings], p.id
        for label, wanted in sm.SETTINGS.items():
            assert any(wanted(*s) for s in settings), (p.id, label)


@pytest.mark.parametrize("name, family", [
    ("test_faithful_mode_equals_reference[hf-qwen2_5_vl-video-left-a0-b5-w3+a1-b5-w3]", "qwen2_5_vl"),
    ("test_contrast_side_never_calls_lm_head_nor_makes_vocab_sized_tensors[hf-llava-image-right-drop]", "llava"),
    ("test_verify_passes_on_every_family[llava_next-image-left]", "llava_next"),
    ("test_generate_is_unchanged[testing-tiny_llava-eager-right]", None),
])
def test_family_of_a_test_id(name, family):
    keys = {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl"}
    module = PROPS if "[hf-" in name or "testing" in name else VERIFY
    assert sm.family_of(name, module, keys) == family
    if family and module == PROPS:
        assert re.fullmatch(r"hf-\w+-(image|video)-(right|left)", sm.CASE_ID.search(name).group(1))


def test_release_columns_follow_where_a_family_ran(tmp_path):
    """A class proven on a release whose image-text-to-text mapping lacks it (Idefics 1 and UDOP sat
    under another auto mapping on 4.45) lists that release among the releases that have it; a family
    whose tests on a release all skip, some because the class needs a later release and some for a
    reason that holds everywhere (the mask refusal), shows `-` there, not "pass 0/n"."""
    fams = {"idefics": ["Idefics", "IdeficsForVisionText2Text"],
            "minicpmv4_6": ["MiniCPM-V-4.6", "MiniCPMV4_6ForConditionalGeneration"]}
    both = {cls: PROVEN for _, cls in fams.values()}
    newer = full_set("idefics") + full_set("minicpmv4_6", test_drop_equals_mask_on_text_rows=NOT_APPLICABLE)
    write(tmp_path, "py", "5.24.0", both, newer, families=fams)
    later = "MiniCPMV4_6ForConditionalGeneration needs transformers >= 5.0 (installed 4.45.2)"
    older = full_set("idefics") + [(PROPS, "test_drop_equals_mask_on_text_rows[hf-minicpmv4_6-image-right]",
                                    NOT_APPLICABLE),
                                   (CALLS, "test_faithful_mode_equals_reference[minicpmv4_6-image]", later)]
    write(tmp_path, "hf-4.45", "4.45.2", {}, older, families=fams)
    text = generate(tmp_path)
    assert row(text, "IdeficsForVisionText2Text").startswith(
        "| `IdeficsForVisionText2Text` | proven (4.45.2, 5.24.0) | all |")
    assert "| MiniCPM-V-4.6 | `MiniCPMV4_6ForConditionalGeneration` | - | pass 10/12, 2 skipped [1] |" in text

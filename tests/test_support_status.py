"""The class list of docs/support-matrix.md: every class the installed transformers maps to
image-text-to-text, with calplug's support status for it, recorded in this env's junit results
(testsuite property ``calplug_support``) for tests/support_matrix.py, which the tox env
``support-matrix`` runs with the standard library only.

Run by every env of the transformers matrix (tox.ini: py, hf-4.45, hf-4.49, hf-4.57).
"""
from __future__ import annotations

import json

import pytest

from calplug.integrations import families
import _hf_families as hf

STATUSES = ("proven", "refused", "matched")


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
        status, reason = families.support_status(name)
        assert status in STATUSES and reason, name
        statuses[name] = [status, reason, name in classes]
    for name, (status, reason, _) in statuses.items():
        if status == "proven":
            facts = families.FAMILIES[name]
            assert facts.key in hf.FAMILIES and hf.FAMILIES[facts.key].class_name == name
        if name in families.REFUSED:
            assert status == "refused" and reason == families.REFUSED[name]
    assert statuses["LlavaForConditionalGeneration"][0] == "proven"
    keys = {f.key: [f.family, f.class_name] for f in families.FAMILIES.values()}
    record_testsuite_property("transformers", transformers.__version__)
    record_testsuite_property("calplug_support", json.dumps(
        {"mapping": mapping, "classes": statuses, "families": keys}, sort_keys=True))

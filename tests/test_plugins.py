"""Plugins: built-ins are registered like third-party ones; entry points load; docs examples run."""
import sys

import pytest
import torch

import calplug
from calplug import plugins
from calplug.contrast import masked_attention_plan
from calplug.hookspecs import Contrast
from calplug.testing import llava_batch, tiny_llava


def test_builtins_are_plugins_on_the_same_manager():
    pm = plugins.get_plugin_manager()
    names = {pm.get_name(p) for p in pm.get_plugins()}
    assert {"calplug.builtin", "calplug.integrations.transformers_vlm"} <= names
    assert {"mask", "drop", "patch_mask"} <= set(plugins.contrast_names())
    assert any(i.name == "transformers-llava" for i in plugins.integrations())


@pytest.fixture
def fresh_manager(monkeypatch):
    monkeypatch.setattr(plugins, "_manager", None)
    yield
    plugins._manager = None


def test_entry_point_plugin_is_loaded(tmp_path, monkeypatch, fresh_manager):
    pkg = tmp_path / "site"
    (pkg / "demo_cal_plugin.py").parent.mkdir(parents=True)
    (pkg / "demo_cal_plugin.py").write_text(
        "import calplug\n"
        "from calplug.hookspecs import Contrast\n"
        "@calplug.hookimpl\n"
        "def calplug_contrasts():\n"
        "    return [Contrast('from_entry_point', lambda main, config: None)]\n")
    dist = pkg / "demo_cal_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-cal-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[calplug]\ndemo = demo_cal_plugin\n")
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.delenv("CALPLUG_DISABLE_ENTRYPOINTS", raising=False)
    assert "from_entry_point" in plugins.contrast_names()
    assert calplug.CALConfig(contrast="from_entry_point").contrast == "from_entry_point"
    sys.modules.pop("demo_cal_plugin", None)


def test_entry_points_can_be_disabled(tmp_path, monkeypatch, fresh_manager):
    monkeypatch.setenv("CALPLUG_DISABLE_ENTRYPOINTS", "1")
    assert "from_entry_point" not in plugins.contrast_names()


# -- the examples of docs/plugins.md --------------------------------------------------------------
class SigmoidWeights:
    @calplug.hookimpl
    def calplug_weights(self, gaps, supervised, config):
        return config.alpha + (config.beta - config.alpha) * torch.sigmoid(gaps)


class FirstHalf:
    @calplug.hookimpl
    def calplug_contrasts(self):
        def first_half(main, config):
            visual = main.visual_mask
            first = visual & (visual.long().cumsum(1) <= visual.sum(1, keepdim=True) // 2)
            return masked_attention_plan(main, first) if first.any() else None
        return [Contrast("first_half", first_half)]


def test_docs_examples_run_and_change_the_result():
    model = tiny_llava().train()
    batch = llava_batch(model)
    calplug.enable(model, contrast="mask", alpha=0.0, beta=5.0)
    full = model(**batch)
    plugins.register(SigmoidWeights(), name="doc-sigmoid")
    plugins.register(FirstHalf(), name="doc-first-half")
    try:
        soft = model(**batch)
        expected = 5.0 * torch.sigmoid(soft.cal_gaps)
        torch.testing.assert_close(soft.cal_weights, expected)
        calplug.enable(model, contrast="first_half")
        half = model(**batch)
    finally:
        plugins.unregister(name="doc-sigmoid")
        plugins.unregister(name="doc-first-half")
    image_rows = slice(0, 17)
    # hiding half of the image moves the gaps, but not to where hiding all of it does
    assert not torch.allclose(half.cal_gaps[:, 17:], full.cal_gaps[:, 17:])
    assert torch.all(half.cal_gaps[2] == 0)  # text-only sample
    assert half.cal_gaps[:2, image_rows].abs().sum() > 0

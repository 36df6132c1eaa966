"""axolotl (tox -e axolotl): a tiny Llava trained for 3 steps on CPU by ``axolotl train``, plain and
with ``plugins: [calplug.frameworks.axolotl.CALPlugin]`` + ``cal: true``; refusals through
axolotl's own config loading (plugin registration and schema validation)."""
from __future__ import annotations

import importlib.metadata

import pytest
import yaml

# Skips only where the package itself is not installed; a missing dependency of it raises
# (tests/_skips.py), and tox -e axolotl fails instead of skipping (CALPLUG_REQUIRE).
from _skips import importorskip  # noqa: E402

importorskip("axolotl", "axolotl", "run tox -e axolotl")

import _tiny  # noqa: E402
from conftest import BIN, assert_cal_was_active, run, step_logs, tail  # noqa: E402

import calplug  # noqa: E402

STEPS = 3
PLUGIN = "calplug.frameworks.axolotl.CALPlugin"


def config(root, model, data, out, **extra) -> str:
    values = dict(
        base_model=str(model), processor_type="AutoProcessor", skip_prepare_dataset=True,
        remove_unused_columns=False, chat_template="tokenizer_default",
        datasets=[dict(path=str(data), ds_type="json", type="chat_template", field_messages="messages")],
        dataset_prepared_path=str(root / "prepared"), val_set_size=0.0, output_dir=str(out),
        sequence_len=128, micro_batch_size=2, gradient_accumulation_steps=1, max_steps=STEPS,
        num_epochs=1, optimizer="adamw_torch", lr_scheduler="constant", learning_rate=0.001,
        warmup_steps=0, bf16=False, fp16=False, tf32=False, logging_steps=1, save_strategy="no",
        seed=0, dataloader_num_workers=0, **extra)
    path = root / f"{out.name}.yml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("axolotl")
    model = _tiny.build_model_folder(root / "tiny-llava")
    data = _tiny.write_axolotl_data(root / "data")
    return root, model, data


@pytest.fixture(scope="module")
def runs(setup):
    root, model, data = setup
    plain = run([str(BIN / "axolotl"), "train", config(root, model, data, root / "plain")], root)
    cal = run([str(BIN / "axolotl"), "train", config(root, model, data, root / "cal", plugins=[PLUGIN],
                                                      cal=True, cal_alpha=0.0)], root)
    return plain, cal


def test_cal_trains_through_axolotl(runs):
    plain, cal = runs
    assert plain.returncode == 0, tail(plain.stdout)
    assert cal.returncode == 0, tail(cal.stdout)
    assert f"Plugin loaded successfully: {PLUGIN}" in cal.stdout
    assert_cal_was_active(step_logs(cal.stdout), step_logs(plain.stdout), STEPS)
    print("\n".join(line for line in cal.stdout.splitlines() if "cal/mean_weight" in line))


def load(setup, **extra):
    """axolotl's own config loading: registers the listed plugins, merges their schemas, validates."""
    from axolotl.cli.config import load_cfg

    root, model, data = setup
    return load_cfg(config(root, model, data, root / "load", plugins=[PLUGIN], **extra))


def test_incompatible_option_is_refused_with_the_reason(setup):
    with pytest.raises(Exception) as refused:
        load(setup, cal=True, sample_packing=True)
    assert (
        "axolotl: CAL cannot run with sample_packing=True: it packs several samples into one row, "
        "and CAL's contrast pass and pooling would mix them (calplug needs one sample per row). "
        "Set sample_packing to false, or turn CAL off (cal: false)."
    ) in str(refused.value)


@pytest.mark.parametrize("extra, message", [
    (dict(use_eaft=True), "CAL cannot run with use_eaft=True: EAFT computes the loss outside"),
    (dict(chunked_cross_entropy=True), "CAL cannot run with chunked_cross_entropy=True"),
    (dict(cal_pool_window=2), "pool_window must be a positive odd integer"),
])
def test_refusals_and_bad_settings_fail_at_config_load(setup, extra, message):
    with pytest.raises(Exception, match=message):
        load(setup, cal=True, **extra)


def test_settings_are_axolotl_keys_and_off_by_default(setup):
    cfg = load(setup, cal=True, cal_alpha=0.25, cal_contrast="mask")
    assert cfg.cal is True and cfg.cal_alpha == 0.25 and cfg.cal_contrast == "mask"
    assert load(setup, sample_packing=False).cal is False  # the plugin alone changes nothing


def test_plugin_enables_cal_only_when_asked(setup):
    from axolotl.utils.dict import DictDefault

    from calplug.frameworks.axolotl import CALPlugin

    _, model_dir, _ = setup
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    CALPlugin().post_model_load(DictDefault(cal=False, cal_alpha=0.5), model)
    assert not calplug.is_enabled(model)
    CALPlugin().post_model_load(DictDefault(cal=True, cal_alpha=0.5, cal_beta=None), model)
    assert calplug.config_of(model).alpha == 0.5 and calplug.config_of(model).beta == 5.0


def test_entry_point_for_axolotl_0_21_names_the_plugin():
    (entry,) = [e for e in importlib.metadata.entry_points(group="axolotl.plugins")
                if e.name == "calplug"]
    assert entry.value == "calplug.frameworks.axolotl:CALPlugin"
    from calplug.frameworks.axolotl import CALPlugin

    assert entry.load() is CALPlugin

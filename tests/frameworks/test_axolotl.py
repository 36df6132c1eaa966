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

import _exact  # noqa: E402
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
    found = {}
    for name in ("plain", "plain_again"):   # the second: the determinism control
        found[name] = run([str(BIN / "axolotl"), "train", config(root, model, data, root / name)], root,
                          **_exact.recording(root / f"rec-{name}"))
    found["cal"] = run([str(BIN / "axolotl"), "train", config(root, model, data, root / "cal",
                                                              plugins=[PLUGIN], cal=True, cal_alpha=0.0)],
                       root, **_exact.recording(root / "rec-cal"))
    return found


def test_cal_trains_through_axolotl(runs):
    plain, cal = runs["plain"], runs["cal"]
    assert plain.returncode == 0, tail(plain.stdout)
    assert runs["plain_again"].returncode == 0, tail(runs["plain_again"].stdout)
    assert cal.returncode == 0, tail(cal.stdout)
    assert f"Plugin loaded successfully: {PLUGIN}" in cal.stdout
    assert_cal_was_active(step_logs(cal.stdout), step_logs(plain.stdout), STEPS)
    print("\n".join(_exact.log_lines(cal.stdout)))


def test_the_logged_cal_loss_is_calplugs_loss_on_the_same_batch(setup, runs):
    """The first step's logged loss is the CAL loss calplug computes here for the batch the model
    received (recorded in the run), and two plain runs log identical losses at every step."""
    root, model, _ = setup
    figures = _exact.assert_exact_against_plain(
        _exact.read(root / "rec-cal"), _exact.read(root / "rec-plain"),
        _exact.read(root / "rec-plain_again"), model, {"alpha": 0.0})
    print(figures)


def load(setup, plugins=(PLUGIN,), **extra):
    """axolotl's own config loading: registers the listed plugins, merges their schemas, validates."""
    from axolotl.cli.config import load_cfg

    root, model, data = setup
    return load_cfg(config(root, model, data, root / "load", plugins=list(plugins), **extra))


# -- Liger through axolotl's Liger plugin (its Triton kernels do not run on a CPU) ------------------
LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"
LIGER_FLCE_WHY = (
    "replaces the model's forward with one that computes its own unweighted cross-entropy without "
    "logits, which CAL's per-token weights cannot enter (Liger-Kernel #338): applied after "
    "calplug.enable it removes the CAL step, applied before it saves nothing")
LAYER_KERNELS = ("liger_rope, liger_rms_norm, liger_glu_activation, liger_layer_norm")


@pytest.mark.parametrize("option, message", [
    ("liger_fused_linear_cross_entropy",
     f"axolotl: CAL cannot run with liger_fused_linear_cross_entropy=True: that Liger kernel "
     f"{LIGER_FLCE_WHY}. Liger's other kernels ({LAYER_KERNELS}) compose with CAL, and for the memory "
     "it saves set cal_loss_chunk: 1024. Set liger_fused_linear_cross_entropy to false, or turn CAL "
     "off (cal: false)."),
    ("liger_cross_entropy",
     "axolotl: CAL cannot run with liger_cross_entropy=True: that Liger kernel replaces "
     "torch.nn.functional.cross_entropy for the whole process, and its reduction='none' path, which "
     "a weighted loss needs, gives wrong gradients (Liger-Kernel #968). Liger's other kernels "
     f"({LAYER_KERNELS}) compose with CAL. Set liger_cross_entropy to false, or turn CAL off (cal: false)."),
])
def test_liger_loss_kernels_are_refused_at_config_load(setup, option, message):
    with pytest.raises(Exception) as refused:
        load(setup, plugins=(LIGER_PLUGIN, PLUGIN), cal=True, liger_rms_norm=True, **{option: True})
    assert message in str(refused.value)


def test_liger_layer_kernels_compose_with_cal(setup):
    """axolotl's Liger plugin with its layer kernels: the config loads with CAL on, and what the
    plugin patches before the model loads leaves Llava's forward to calplug (axolotl passes the
    loss kernels as unset, which Liger reads as off)."""
    from axolotl.integrations.liger import LigerPlugin
    from transformers import LlavaForConditionalGeneration

    cfg = load(setup, plugins=(LIGER_PLUGIN, PLUGIN), cal=True, liger_rope=True, liger_rms_norm=True,
               liger_glu_activation=True, liger_layer_norm=True)
    assert cfg.cal is True and cfg.liger_rms_norm is True and not cfg.liger_fused_linear_cross_entropy
    own = LlavaForConditionalGeneration.forward
    LigerPlugin().pre_model_load(cfg)
    assert LlavaForConditionalGeneration.forward is own
    _, model_dir, _ = setup
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).train()
    calplug.enable(model)
    assert type(model.__dict__["forward"]).__name__ == "CALForward"


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


def _axolotl_version() -> tuple[int, ...]:
    return tuple(int(p) for p in importlib.metadata.version("axolotl").split(".")[:2])


@pytest.mark.skipif(_axolotl_version() < (0, 21), reason="axolotl < 0.21 loads no plugin from the "
                    "axolotl.plugins entry point (0.21 needs Python 3.12): run tox -e axolotl-py312")
def test_cal_true_without_a_plugins_line_loads_calplug_through_the_entry_point(setup):
    """axolotl >= 0.21 loads installed plugins from the ``axolotl.plugins`` entry point, which
    calplug declares: ``cal: true`` alone trains with CAL, and the first step's loss is
    calplug's on the recorded batch."""
    root, model, data = setup
    cfg = config(root, model, data, root / "entry", cal=True, cal_alpha=0.0)
    assert "plugins" not in yaml.safe_load(open(cfg))
    result = run([str(BIN / "axolotl"), "train", cfg], root, **_exact.recording(root / "rec-entry"))
    assert result.returncode == 0, tail(result.stdout)
    logs = step_logs(result.stdout)
    assert len(logs) == STEPS and all(0.0 <= log["cal/mean_weight"] < 0.5 for log in logs), logs
    _exact.assert_first_step_exact(_exact.read(root / "rec-entry"), model, {"alpha": 0.0})
    print("\n".join(_exact.log_lines(result.stdout)))


def test_entry_point_for_axolotl_0_21_names_the_plugin():
    (entry,) = [e for e in importlib.metadata.entry_points(group="axolotl.plugins")
                if e.name == "calplug"]
    assert entry.value == "calplug.frameworks.axolotl:CALPlugin"
    from calplug.frameworks.axolotl import CALPlugin

    assert entry.load() is CALPlugin

"""ms-swift (tox -e swift): a tiny Llava trained for 3 steps on CPU by ``swift sft``, plain and with
``--external_plugins "$(calplug swift-plugin)" --callbacks cal``; and the Qwen2-VL path where
ms-swift merges the images into ``inputs_embeds`` before the forward, run through ms-swift's own
pre-forward hook on a tiny Qwen2-VL (the whole ``swift sft`` Qwen2-VL run needs torchvision:
tox -e swift-qwen2vl)."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

# Skips only where the package itself is not installed; a missing dependency of it raises
# (tests/_skips.py), and tox -e swift fails instead of skipping (CALPLUG_REQUIRE).
from _skips import importorskip  # noqa: E402

importorskip("swift", "swift", "run tox -e swift (ms-swift)")

import _exact  # noqa: E402
import _tiny  # noqa: E402
from conftest import BIN, assert_cal_was_active, run, step_logs, tail  # noqa: E402

import calplug  # noqa: E402
from calplug.errors import CALConfigError, CALInputError  # noqa: E402
from calplug.frameworks import swift as adapter  # noqa: E402

STEPS = 3


def sft(model, dataset, out, *extra, model_type="llava1_5_hf") -> list[str]:
    return [str(BIN / "swift"), "sft", "--model", str(model), "--model_type", model_type,
            "--template", model_type, "--dataset", str(dataset), "--split_dataset_ratio", "0",
            "--tuner_type", "full", "--torch_dtype", "float32", "--max_length", "128",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
            "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--warmup_ratio", "0",
            "--max_steps", str(STEPS), "--logging_steps", "1", "--save_strategy", "no",
            "--report_to", "none", "--seed", "0", "--dataloader_num_workers", "0",
            "--dataset_num_proc", "1", "--check_model", "false", "--output_dir", str(out), *extra]


def with_cal(*extra) -> list[str]:
    return ["--external_plugins", adapter.plugin_path(), "--callbacks", "cal", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("swift")
    model = _tiny.build_model_folder(root / "tiny-llava")
    data = _tiny.write_swift_data(root / "data")
    settings = root / "cal.yaml"
    settings.write_text("alpha: 0.0\n")
    found = dict(root=root, model=model, data=data, settings=settings)
    for name in ("plain", "plain_again"):   # the second: the determinism control
        found[name] = run(sft(model, data, root / name), root, **_exact.recording(root / f"rec-{name}"))
    found["cal"] = run(sft(model, data, root / "cal", *with_cal()), root, CALPLUG_CONFIG=str(settings),
                       **_exact.recording(root / "rec-cal"))
    return found


def test_the_logged_cal_loss_is_calplugs_loss_on_the_same_batch(runs):
    """The first step's logged loss is the CAL loss calplug computes here for the batch the model
    received (recorded in the run), and two plain runs log identical losses at every step."""
    root = runs["root"]
    figures = _exact.assert_exact_against_plain(
        _exact.read(root / "rec-cal"), _exact.read(root / "rec-plain"),
        _exact.read(root / "rec-plain_again"), runs["model"], {"alpha": 0.0})
    print(figures)


def test_cal_trains_through_swift_sft(runs):
    plain, cal = runs["plain"], runs["cal"]
    assert plain.returncode == 0, tail(plain.stdout)
    assert runs["plain_again"].returncode == 0, tail(runs["plain_again"].stdout)
    assert cal.returncode == 0, tail(cal.stdout)
    assert_cal_was_active(step_logs(cal.stdout), step_logs(plain.stdout), STEPS)
    # ms-swift's own log file has the keys too (the callback runs before its logging callback)
    (jsonl,) = (runs["root"] / "cal").glob("*/logging.jsonl")
    logged = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert sum("cal/mean_weight" in entry for entry in logged) == STEPS, logged
    print("\n".join(_exact.log_lines(cal.stdout)))


def test_incompatible_option_is_refused_with_the_reason(runs):
    result = run(sft(runs["model"], runs["data"], runs["root"] / "dft",
                     *with_cal("--enable_dft_loss", "true")), runs["root"],
                 CALPLUG_CONFIG=str(runs["settings"]))
    assert result.returncode != 0
    message = ("ms-swift: CAL cannot run with --enable_dft_loss=True: DFT computes the loss "
               "outside the model from (outputs, labels) and takes labels out of the model call, "
               "so calplug's forward would never see them and CAL would silently do nothing. Set "
               "--enable_dft_loss to false, or turn CAL off (cal: false).")
    assert message in result.stdout, tail(result.stdout)
    assert not step_logs(result.stdout)  # refused before the first step


def test_plugin_file_is_alone_in_its_folder():
    path = adapter.plugin_path()
    folder = adapter.PLUGIN_FILE.parent
    assert sorted(p.name for p in folder.iterdir() if p.name != "__pycache__") == ["calplug_swift.py"]
    result = run([str(BIN / "calplug"), "swift-plugin"], folder, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == path


def test_refusals_read_swift_options():
    class Args:
        loss_type = None
        enable_dft_loss = enable_channel_loss = use_liger_kernel = False
        label_smoothing_factor = 0.0
        tuner_backend = "peft"
        use_logits_to_keep = None

    class Template:
        mode, task_type = "train", "causal_lm"
        sequence_parallel_size, packing, padding_free = 1, False, False
        is_binary_loss_scale = True

    adapter.refuse(adapter.FRAMEWORK, adapter.REFUSED, adapter.options(Args, Template))  # all off
    for attr, value, option in [("padding_free", True, "--padding_free"), ("mode", "rlhf", "swift rlhf"),
                                ("sequence_parallel_size", 2, "--sequence_parallel_size")]:
        template = type("T", (Template,), {attr: value})
        with pytest.raises(CALConfigError, match=f"CAL cannot run with {option}="):
            adapter.refuse(adapter.FRAMEWORK, adapter.REFUSED, adapter.options(Args, template))
    args = type("A", (Args,), {"use_logits_to_keep": True})
    with pytest.raises(CALConfigError, match="--use_logits_to_keep=True: calplug needs the logits"):
        adapter.refuse(adapter.FRAMEWORK, adapter.REFUSED, adapter.options(args, Template))


# -- Qwen2-VL: images merged into inputs_embeds by ms-swift's pre-forward hook ----------------------
def qwen_template():
    """ms-swift's Qwen2-VL template, for its ``pre_forward_hook`` / ``_post_encode`` only. Its
    constructor wants the processor ms-swift loads itself (Qwen2-VL's loads a video processor,
    which needs torchvision); the hook needs only the training mode and the model."""
    from swift.template.templates.qwen import Qwen2VLTemplate

    template = object.__new__(Qwen2VLTemplate)
    template.mode, template._handles, template._deepspeed_initialize = "train", [], None
    template.processor = None  # only read for text-only batches (a dummy image)
    return template


@pytest.fixture()
def qwen():
    import _hf_families as fam

    family = fam.FAMILIES["qwen2_vl"]
    model = family.build(seed=0).train()
    from swift.model.register import _set_property

    _set_property(model, "visual")  # model.visual, as ms-swift's loader gives it on transformers 5
    batch = fam.make_batch(family, model, kinds=("image", "image", "image"))
    decoder, _ = fam.decoder_and_head(model)
    from calplug.integrations.capture import capture_decoder_call

    with torch.no_grad(), capture_decoder_call(decoder) as seen:  # the positions ms-swift passes
        model(**{k: v for k, v in batch.items() if k != "labels"})
    batch["position_ids"] = seen["position_ids"]
    calplug.enable(model, alpha=0.0)
    return model, batch


def test_qwen2_vl_premerged_embeds_through_swifts_hook_equal_the_input_ids_path(qwen):
    model, batch = qwen
    if "mm_token_type_ids" not in batch:
        pytest.skip("needs transformers >= 5.3 (mm_token_type_ids)")
    reference = model(**batch)
    template = qwen_template()
    template.register_post_encode_hook([model])
    seen = []  # what calplug's forward receives: hooks run in the order they were registered
    recorder = model.register_forward_pre_hook(lambda m, a, kw: seen.append(set(kw)), with_kwargs=True)
    try:
        merged = model(**batch)
    finally:
        template.remove_post_encode_hook()
        recorder.remove()
    assert "inputs_embeds" in seen[0] and "input_ids" not in seen[0], seen
    assert "pixel_values" not in seen[0] and "mm_token_type_ids" in seen[0], seen
    assert reference.cal_gaps.abs().max() > 0
    torch.testing.assert_close(merged.cal_gaps, reference.cal_gaps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.loss, reference.loss, rtol=1e-5, atol=1e-6)


# The reference call imitates transformers < 5.3 (no mm_token_type_ids) on a newer release, which
# warns about M-RoPE; the explicit position_ids keep M-RoPE, so both calls use the same positions.
@pytest.mark.filterwarnings("ignore:Qwen2VLForConditionalGeneration. image_grid_thw")
def test_qwen2_vl_without_mm_token_type_ids_needs_the_callbacks_mask(qwen):
    """Below transformers 5.3 ms-swift sends no mm_token_type_ids: calplug refuses the merged call
    (it cannot see the images), and the callback's wrapped _post_encode supplies the mask."""
    model, batch = qwen
    batch.pop("mm_token_type_ids", None)
    reference = model(**batch)
    template = qwen_template()
    template.register_post_encode_hook([model])
    try:
        with pytest.raises(CALInputError, match="calplug_visual_mask"):
            model(**batch)
        callback = adapter.SwiftCALCallback(args=None, trainer=None)
        callback._carry_visual_positions(template)
        merged = model(**batch)
    finally:
        template.remove_post_encode_hook()
    torch.testing.assert_close(merged.cal_gaps, reference.cal_gaps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.loss, reference.loss, rtol=1e-5, atol=1e-6)


QWEN_ENV = importlib.util.find_spec("torchvision") is not None and \
    importlib.util.find_spec("qwen_vl_utils") is not None


@pytest.mark.skipif(not QWEN_ENV, reason="swift sft on Qwen2-VL needs torchvision and qwen_vl_utils "
                    "(Qwen2-VL's processor and ms-swift's Qwen2-VL loader import them): run tox -e "
                    "swift-qwen2vl (torch 2.14.1 + torchvision 0.29.1)")
def test_qwen2_vl_trains_through_swift_sft_with_premerged_embeddings(tmp_path):
    model = _tiny.build_qwen2_vl_folder(tmp_path / "tiny-qwen2-vl")
    data = _tiny.write_swift_data(tmp_path / "data", image=56)
    settings = tmp_path / "cal.yaml"
    settings.write_text("alpha: 0.0\n")
    pixels = dict(MAX_PIXELS="3136", MIN_PIXELS="3136")
    plain = run(sft(model, data, tmp_path / "plain", model_type="qwen2_vl"), tmp_path, **pixels)
    cal = run(sft(model, data, tmp_path / "cal", *with_cal(), model_type="qwen2_vl"), tmp_path,
              CALPLUG_CONFIG=str(settings), **pixels)
    assert plain.returncode == 0, tail(plain.stdout)
    assert cal.returncode == 0, tail(cal.stdout)
    assert "Successfully registered post_encode hook" in cal.stdout  # the merge did happen
    assert_cal_was_active(step_logs(cal.stdout), step_logs(plain.stdout), STEPS)
    print("\n".join(line for line in cal.stdout.splitlines() if "cal/mean_weight" in line))


# -- Liger: --use_liger_kernel (its Triton kernels do not run on a CPU: checked at the config) ------
def _training_args(tmp_path, **kwargs):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)


def test_liger_without_a_kernel_config_gets_its_layer_kernels_only(tmp_path, monkeypatch):
    """ms-swift builds callbacks before the Trainer, which applies Liger from the same arguments:
    the callback leaves Liger's layer kernels on and its loss kernels off, and says so once. (ms-
    swift's command line cannot set liger_kernel_config: transformers' parser refuses a dict.)"""
    monkeypatch.setattr(calplug.errors, "_WARNED", set())
    args = _training_args(tmp_path, use_liger_kernel=True)
    with pytest.warns(calplug.CALWarning) as shown:
        adapter.SwiftCALCallback(args, trainer=None)
    assert args.liger_kernel_config == {"fused_linear_cross_entropy": False, "cross_entropy": False}
    assert str(shown[0].message) == (
        "calplug: --use_liger_kernel with CAL: Liger's layer kernels (RMSNorm, RoPE, SwiGLU) are "
        "applied, its fused linear cross-entropy is not, because CAL weights each token's loss and "
        "that kernel computes an unweighted one without logits (ms-swift's command line cannot set "
        "liger_kernel_config, so calplug sets it to {'fused_linear_cross_entropy': False, "
        "'cross_entropy': False}). For the memory the fused loss saves, set loss_chunk: 1024 in "
        "$CALPLUG_CONFIG.")
    from calplug.frameworks import liger

    liger.check_trainer(type("T", (), {"args": args})())   # what the Trainer will apply: composes
    plain = _training_args(tmp_path)
    adapter.SwiftCALCallback(plain, trainer=None)
    assert plain.liger_kernel_config is None                 # no Liger asked for: nothing set


def test_liger_loss_kernels_set_explicitly_are_refused_when_training_begins(tmp_path):
    class Template:
        mode, task_type = "train", "causal_lm"
        sequence_parallel_size, packing, padding_free = 1, False, False
        is_binary_loss_scale = True

    args = _training_args(tmp_path, use_liger_kernel=True,
                          liger_kernel_config={"fused_linear_cross_entropy": True})
    trainer = type("Trainer", (), {"args": args, "template": Template()})()
    callback = adapter.SwiftCALCallback(args, trainer)
    with pytest.raises(CALConfigError) as refused:
        callback.on_train_begin(args, state=None, control=None, model=None)
    assert str(refused.value).startswith(
        "ms-swift: CAL cannot run with --use_liger_kernel true: Liger's fused_linear_cross_entropy "
        "kernel is on, and it replaces the model's forward with one that computes its own unweighted "
        "cross-entropy without logits, which CAL's per-token weights cannot enter (Liger-Kernel #338): "
        "applied after calplug.enable it removes the CAL step, applied before it saves nothing. Keep "
        "Liger and switch its loss kernels off with liger_kernel_config unset (calplug then applies "
        "Liger's layer kernels only)")

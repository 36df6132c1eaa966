"""LLaMA-Factory (tox -e llamafactory): a tiny Llava trained for 3 steps on CPU by LLaMA-Factory's
own training entry, plain (``llamafactory-cli train``) and with CAL (``calplug llamafactory
train``, which hands the YAML minus its cal keys to ``run_exp`` with calplug's callback)."""
from __future__ import annotations

import json
import sys

import pytest
import yaml

# Skips only where the package itself is not installed; a missing dependency of it raises
# (tests/_skips.py), and tox -e llamafactory fails instead of skipping (CALPLUG_REQUIRE).
from _skips import importorskip  # noqa: E402

importorskip("llamafactory", "llamafactory", "run tox -e llamafactory (LLaMA-Factory)")

import _exact  # noqa: E402
import _tiny  # noqa: E402
from conftest import BIN, assert_cal_was_active, run, step_logs, tail  # noqa: E402

from calplug.frameworks import llamafactory as adapter  # noqa: E402

STEPS = 3


def config(root, model, data, out, **extra) -> str:
    values = dict(
        model_name_or_path=str(model), stage="sft", do_train=True, finetuning_type="full",
        dataset="tiny_mm", dataset_dir=str(data), template="llava", cutoff_len=128,
        overwrite_cache=True, preprocessing_num_workers=1, dataloader_num_workers=0,
        output_dir=str(out), logging_steps=1, save_strategy="no", overwrite_output_dir=True,
        report_to="none", per_device_train_batch_size=2, gradient_accumulation_steps=1,
        learning_rate=1.0e-3, max_steps=STEPS, lr_scheduler_type="constant", bf16=False,
        use_cpu=True, seed=0, **extra)
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamafactory")
    model = _tiny.build_model_folder(root / "tiny-llava")
    data = _tiny.write_llamafactory_data(root / "data")
    found = dict(root=root, model=model, data=data)
    for name in ("plain", "plain_again"):   # the second: the determinism control
        found[name] = run([str(BIN / "llamafactory-cli"), "train", config(root, model, data, root / name)],
                          root, **_exact.recording(root / f"rec-{name}"))
    cal_cfg = config(root, model, data, root / "cal", cal=True, cal_alpha=0.0)
    found["cal"] = run([str(BIN / "calplug"), "llamafactory", "train", cal_cfg], root,
                       **_exact.recording(root / "rec-cal"))
    return found


def test_cal_trains_through_llamafactory(runs):
    plain, cal = runs["plain"], runs["cal"]
    assert plain.returncode == 0, tail(plain.stdout)
    assert runs["plain_again"].returncode == 0, tail(runs["plain_again"].stdout)
    assert cal.returncode == 0, tail(cal.stdout)
    assert_cal_was_active(step_logs(cal.stdout), step_logs(plain.stdout), STEPS)
    print("\n".join(_exact.log_lines(cal.stdout)))


def test_the_logged_cal_loss_is_calplugs_loss_on_the_same_batch(runs):
    """The first step's logged loss is the CAL loss calplug computes here for the batch the model
    received (recorded in the run), and two plain runs log identical losses at every step."""
    root = runs["root"]
    figures = _exact.assert_exact_against_plain(
        _exact.read(root / "rec-cal"), _exact.read(root / "rec-plain"),
        _exact.read(root / "rec-plain_again"), runs["model"], {"alpha": 0.0})
    print(figures)


def test_llamafactory_rejects_cal_keys_without_calplug(runs):
    """Why the runner exists: LLaMA-Factory itself refuses the cal keys."""
    cfg = config(runs["root"], runs["model"], runs["data"], runs["root"] / "unknown", cal=True)
    result = run([str(BIN / "llamafactory-cli"), "train", cfg], runs["root"], timeout=600)
    assert result.returncode != 0
    assert "Some keys are not used by the HfArgumentParser: ['cal']" in result.stdout, tail(result.stdout)


def test_incompatible_option_is_refused_with_the_reason(runs):
    cfg = config(runs["root"], runs["model"], runs["data"], runs["root"] / "dft", cal=True,
                 use_dft_loss=True)
    result = run([str(BIN / "calplug"), "llamafactory", "train", cfg], runs["root"], timeout=300)
    assert result.returncode == 2, tail(result.stdout)
    assert result.stdout.strip() == (
        "calplug llamafactory: error: LLaMA-Factory: CAL cannot run with use_dft_loss=True: DFT "
        "computes the loss outside the model from (outputs, labels) and takes labels out of the "
        "model call, so calplug's forward would never see them and CAL would silently do nothing. "
        "Set use_dft_loss to false, or turn CAL off (cal: false).")


@pytest.mark.parametrize("option, value", [("packing", True), ("neat_packing", True),
                                           ("stage", "dpo"), ("use_eaft_loss", True)])
def test_every_refused_option_names_itself(tmp_path, option, value):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"cal": True, "model_name_or_path": "x", option: value}))
    with pytest.raises(adapter.CALConfigError, match=f"CAL cannot run with {option}="):
        adapter.train(str(path))


def test_cal_keys_are_split_off_and_checked(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"cal": True, "cal_alpha": 0.5, "stage": "sft", "cutoff_len": 64}))
    settings, rest = adapter.split_config(adapter.read_config(str(path), ["cal_beta=3.0", "cutoff_len=32"]))
    assert settings == {"alpha": 0.5, "beta": 3.0}
    assert rest == {"stage": "sft", "cutoff_len": 32}
    assert adapter.split_config({"cal": False, "cal_alpha": 0.5, "stage": "sft"}) == (None, {"stage": "sft"})
    with pytest.raises(adapter.CALConfigError, match="unknown calplug setting 'cal_alhpa'. Did you mean 'cal_alpha'"):
        adapter.split_config({"cal": True, "cal_alhpa": 0.5})
    path.write_text(json.dumps({"cal": True, "cal_pool_window": 2}))
    path = path.rename(tmp_path / "cfg.json")
    with pytest.raises(adapter.CALConfigError, match="pool_window must be a positive odd integer"):
        adapter.train(str(path))


def test_module_entry_is_what_torchrun_runs(tmp_path):
    """``torchrun ... -m calplug.cli.llamafactory train cfg.yaml``: the module runs the command
    (here: its refusal of a config that does not exist)."""
    result = run([sys.executable, "-m", "calplug.cli.llamafactory", "train",
                  str(tmp_path / "missing.yaml")], tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stdout.strip() == (f"calplug llamafactory: error: LLaMA-Factory config "
                                     f"{str(tmp_path / 'missing.yaml')!r} does not exist")


# -- Liger (its Triton kernels do not run on a CPU: checked at the config) -------------------------
LIGER_FLCE_WHY = (
    "replaces the model's forward with one that computes its own unweighted cross-entropy "
    "without logits, which CAL's per-token weights cannot enter (Liger-Kernel #338): applied after "
    "calplug.enable it removes the CAL step, applied before it saves nothing")
LIGER_MESSAGES = {
    "enable_liger_kernel": (
        "LLaMA-Factory: CAL cannot run with enable_liger_kernel=True: LLaMA-Factory applies Liger with "
        "Liger's defaults, which include the fused_linear_cross_entropy kernel, and has no setting to "
        f"leave it out: that kernel {LIGER_FLCE_WHY}. Liger's other kernels compose with CAL through "
        "the Trainer's own switch: use_liger_kernel: true with liger_kernel_config: "
        "{fused_linear_cross_entropy: false, cross_entropy: false}. Set enable_liger_kernel to false, "
        "or turn CAL off (cal: false)."),
    "fused_linear_cross_entropy": (
        "LLaMA-Factory: CAL cannot run with use_liger_kernel=True: Liger's fused_linear_cross_entropy "
        f"kernel is on, and it {LIGER_FLCE_WHY}. Keep Liger and switch its loss kernels off with "
        "liger_kernel_config: {fused_linear_cross_entropy: false, cross_entropy: false}; Liger's other "
        "kernels (RMSNorm, RoPE, SwiGLU, LayerNorm) compose with CAL, and for the memory Liger's "
        "fused loss saves, set calplug's loss_chunk (e.g. 1024): CAL's weighted cross-entropy in "
        "chunks, without the [B, L, V] logits. Or turn CAL off."),
    "cross_entropy": (
        "LLaMA-Factory: CAL cannot run with use_liger_kernel=True: Liger's cross_entropy kernel is on, "
        "and it replaces torch.nn.functional.cross_entropy for the whole process, and its "
        "reduction='none' path, which a weighted loss needs, gives wrong gradients (Liger-Kernel #968). "
        "Keep Liger and switch its loss kernels off with liger_kernel_config: "
        "{fused_linear_cross_entropy: false, cross_entropy: false}; Liger's other kernels (RMSNorm, "
        "RoPE, SwiGLU, LayerNorm) compose with CAL, and for the memory Liger's fused loss saves, set "
        "calplug's loss_chunk (e.g. 1024): CAL's weighted cross-entropy in chunks, without the "
        "[B, L, V] logits. Or turn CAL off."),
}
LAYER_KERNELS = {"fused_linear_cross_entropy": False, "cross_entropy": False, "rope": True,
                 "rms_norm": True, "swiglu": True}


@pytest.mark.parametrize("options, refused", [
    ({"enable_liger_kernel": True}, "enable_liger_kernel"),
    ({"use_liger_kernel": True}, "fused_linear_cross_entropy"),                 # Liger's default
    ({"use_liger_kernel": True, "liger_kernel_config": {"rms_norm": True}}, "fused_linear_cross_entropy"),
    ({"use_liger_kernel": True, "liger_kernel_config": {"fused_linear_cross_entropy": False,
                                                        "cross_entropy": True}}, "cross_entropy"),
    ({"use_liger_kernel": True, "liger_kernel_config": LAYER_KERNELS}, None),  # composes
])
def test_liger_options_compose_or_are_refused(tmp_path, monkeypatch, options, refused):
    """Refused before LLaMA-Factory loads anything; the composing one goes to LLaMA-Factory as
    written, with calplug's callback (the HF Trainer then applies Liger's layer kernels)."""
    import llamafactory.train.tuner as tuner

    handed = {}
    monkeypatch.setattr(tuner, "run_exp", lambda args, callbacks: handed.update(args=args, callbacks=callbacks))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"cal": True, "model_name_or_path": "x", "stage": "sft", **options}))
    if refused is None:
        assert adapter.train(str(path)) == 0
        assert handed["args"]["use_liger_kernel"] is True
        assert handed["args"]["liger_kernel_config"] == LAYER_KERNELS
        assert [type(c).__name__ for c in handed["callbacks"]] == ["LlamaFactoryCALCallback"]
        return
    with pytest.raises(adapter.CALConfigError) as error:
        adapter.train(str(path))
    assert str(error.value) == LIGER_MESSAGES[refused]
    assert not handed


def test_relaunch_under_torchrun_follows_llamafactory_clis_variables(monkeypatch):
    """Where ``llamafactory-cli train`` relaunches itself with torchrun (FORCE_TORCHRUN, or
    several GPUs), ``calplug llamafactory train`` relaunches ``-m calplug.cli.llamafactory`` with
    the same variables; inside a rank (LOCAL_RANK) it trains."""
    for name in ("FORCE_TORCHRUN", "LOCAL_RANK", "NNODES", "NODE_RANK", "NPROC_PER_NODE",
                 "MASTER_ADDR", "MASTER_PORT", "RDZV_ID"):
        monkeypatch.delenv(name, raising=False)
    assert adapter.torchrun_command("cfg.yaml") is None                # one CPU process
    monkeypatch.setenv("FORCE_TORCHRUN", "1")
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    monkeypatch.setenv("MASTER_PORT", "29123")
    assert adapter.torchrun_command("cfg.yaml", ["cal_alpha=0.5"]) == [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--node_rank", "0",
        "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", "29123",
        "-m", "calplug.cli.llamafactory", "train", "cfg.yaml", "cal_alpha=0.5"]
    monkeypatch.setenv("RDZV_ID", "job")
    with pytest.raises(adapter.CALConfigError, match="RDZV_ID is set: calplug llamafactory does not start"):
        adapter.torchrun_command("cfg.yaml")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert adapter.torchrun_command("cfg.yaml") is None                # a rank: train here

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
    plain_cfg = config(root, model, data, root / "plain")
    cal_cfg = config(root, model, data, root / "cal", cal=True, cal_alpha=0.0)
    plain = run([str(BIN / "llamafactory-cli"), "train", plain_cfg], root)
    cal = run([str(BIN / "calplug"), "llamafactory", "train", cal_cfg], root)
    return dict(root=root, model=model, data=data, plain=plain, cal=cal)


def test_cal_trains_through_llamafactory(runs):
    plain, cal = runs["plain"], runs["cal"]
    assert plain.returncode == 0, tail(plain.stdout)
    assert cal.returncode == 0, tail(cal.stdout)
    assert_cal_was_active(step_logs(cal.stdout), step_logs(plain.stdout), STEPS)
    print("\n".join(line for line in cal.stdout.splitlines() if "cal/mean_weight" in line))


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
